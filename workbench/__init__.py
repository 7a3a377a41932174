"""The Textual workbench: screens and widgets on top of the rlhf engine."""
