"""The napari plugin: widgets, reader, writer, samples (the only code that imports Qt or napari)."""
