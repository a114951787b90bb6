"""How the bundled demo model was trained: `python -m training.train`."""
