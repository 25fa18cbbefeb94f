"""Every training option declared once (the registry), and the ``key=value`` text users write options in."""
