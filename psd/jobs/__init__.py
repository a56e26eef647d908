"""Jobs: the YAML spec, the context an app runs in, and `psd run`."""
