"""Training recipes on the shared loop: the embedded base (`base.py`)."""
