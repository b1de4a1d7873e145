"""The programs: ``vestad`` (the launcher), ``vesta`` (the CLI) and the demo."""
