"""Calibrated float rewrites: SmoothQuant, centered projection inputs, centered keys. Each measures the model on calibration text and rewrites it exactly (the float function is unchanged)."""
