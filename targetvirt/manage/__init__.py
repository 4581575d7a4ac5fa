"""Management: the shell, D-Bus API, rtslib export and the handler daemon."""
