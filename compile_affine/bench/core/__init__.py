"""The benchmark's core: models, compiling and timing variants, measurements, output."""
