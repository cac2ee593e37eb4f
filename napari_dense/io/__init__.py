"""Images in and maps out: lazy sources, physical space, input checks, the probability store."""
