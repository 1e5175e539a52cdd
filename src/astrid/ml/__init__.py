"""Machine learning for AstrID: alert and candidate cutouts, real/bogus models."""
