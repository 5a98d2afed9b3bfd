"""The web workbench: `factedit serve`."""
