"""napari plugin for cellvit_ssl (embedding inspector). napari and Qt are imported lazily."""
