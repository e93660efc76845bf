"""Shared edge helpers for the mesh's processes (logging set-up, event loop); no mesh logic."""
