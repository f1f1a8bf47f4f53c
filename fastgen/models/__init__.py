"""Complete model implementations built on fastgen's ops and modules: one file per model."""
