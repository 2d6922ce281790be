"""Workbench pages, run by st.navigation from app/main.py (scripts, not imported)."""
