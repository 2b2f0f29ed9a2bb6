"""Shared command-line plumbing; imports no other project module."""
