"""Device models. Each knows only its own registers: ``read(offset, size)`` and
``write(offset, size, value)``. What they need from the machine (interrupt lines, DMA ports,
memory) is handed to them when the board is built."""
