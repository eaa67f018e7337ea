"""Filled in by later work (see the open issues)."""
