"""The Gradio app (and its OpenAI-compatible endpoint) over :mod:`phi3v`.

``app.py`` at the top of the repository is the Space entry point; everything else lives here,
one module per concern. The :mod:`phi3v` package never imports this one.
"""
