"""Where profiles come from: measured on this host (``measure``) or estimated for a GPU (``estimate``)."""
