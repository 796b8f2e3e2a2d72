"""report.md, figures and DVC plot files."""
