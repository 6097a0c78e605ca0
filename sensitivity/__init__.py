"""Model intake, Hessian-trace sensitivity and DRQ region calibration."""
