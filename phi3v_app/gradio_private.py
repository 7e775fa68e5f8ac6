"""The one place the app reaches into Gradio's private API, and why.

A request Gradio cannot even parse (too few values, a wrong type, a file path that was never
uploaded) fails in ``Blocks.preprocess_data``, before any handler, validator or exception handler
of ours runs: Gradio then prints a traceback and sends its internal exception text to the caller.
Gradio 6 has no public hook at that point, so :func:`quiet_malformed_requests` wraps that method
of one Blocks instance. ``tests/test_app.py`` checks the method's signature, so a Gradio release
that changes it fails a test instead of silently losing the wrapper.
"""

from __future__ import annotations

import inspect
import logging

import gradio as gr

from phi3v.errors import first_line

log = logging.getLogger("phi3v.app")

# The signature the wrapper below is written for (gradio 6.x).
PREPROCESS_PARAMETERS = ("block_fn", "inputs", "state", "explicit_call")


def wrapped_signature_holds() -> bool:
    """Whether ``gr.Blocks.preprocess_data`` still takes what the wrapper passes on."""
    method = getattr(gr.Blocks, "preprocess_data", None)
    if method is None or not inspect.iscoroutinefunction(method):
        return False
    names = tuple(inspect.signature(method).parameters)[1:]  # without self
    return names == PREPROCESS_PARAMETERS


def quiet_malformed_requests(demo: gr.Blocks) -> None:
    """Make a request Gradio cannot parse get a message saying what to send, and the log one
    line; not a traceback on the console and Gradio's internal exception text to the caller."""
    parse = demo.preprocess_data

    async def preprocess_data(block_fn, inputs, state, explicit_call=False):
        if reason := out_of_range(block_fn, inputs):
            log.warning("refused request to %s: %s", block_fn.name, reason)
            raise gr.Error(reason, print_exception=False)
        try:
            return await parse(block_fn, inputs, state, explicit_call)
        except gr.Error as err:  # Gradio's own check (a file type the input does not take)
            log.warning("refused request to %s: %s", block_fn.name, first_line(err))
            err.print_exception = False
            raise
        except Exception as err:
            reason = f"{type(err).__name__}: {first_line(err)}"
            log.warning("malformed request to %s: %s", block_fn.name, reason)
            raise gr.Error(
                "The request does not fit this endpoint: send the parameters that "
                "client.view_api() lists, with pictures uploaded through handle_file().",
                print_exception=False,
            ) from None

    demo.preprocess_data = preprocess_data


def out_of_range(block_fn, inputs) -> str | None:
    """Which slider value of a request is out of its range, named as the API names it (the
    handler's parameter): Gradio's own check says only "Value 0 is less than minimum value
    1."; None when every slider value is in range (or not a number: Gradio says so)."""
    try:
        names = list(inspect.signature(block_fn.fn).parameters)
    except (TypeError, ValueError):
        names = []
    for index, (component, value) in enumerate(zip(block_fn.inputs, inputs, strict=False)):
        if not isinstance(component, gr.Slider) or isinstance(value, bool):
            continue
        if not isinstance(value, (int, float)) or component.minimum <= value <= component.maximum:
            continue
        name = names[index] if index < len(names) else component.label
        return f"{name} must be from {component.minimum:g} to {component.maximum:g}, got {value:g}."
    return None
