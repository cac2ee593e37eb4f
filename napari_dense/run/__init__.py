"""Running dense networks: tiling, devices, the tiled engine, OME-Zarr output, clusters."""
