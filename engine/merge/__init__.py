"""Static merges: mergekit-style YAML configuration, the merge methods, and the streamed merge run."""
