"""Integration tests (a real local Ray cluster); a package so modules share helpers."""
