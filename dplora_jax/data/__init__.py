"""Task data: local files -> prompts -> fixed-length token arrays."""
