"""Widgets of the workbench, one file per thing on screen."""
