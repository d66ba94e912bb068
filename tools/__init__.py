"""Developer tools of the tierfs repository (not shipped with the package)."""
