"""Markdown tables of the results files, one function per kind of result.

Each benchmark writes its own ``results/<name>.md`` with these, and the generated documents
(``report.py`` -> docs/PERFORMANCE.md, ``reliability.py`` -> docs/RELIABILITY.md) quote the same
tables, so a figure reads the same wherever it appears.
"""

from __future__ import annotations


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def projection_speed(forms: dict) -> str:
    """``prefill_forms.py``: one projection's time, ms, by row count and form."""
    return _table(
        [
            "rows",
            "int4 MatMulNBits (released) ms",
            "int8, one scale per tensor ms",
            "int8, per-row scales ms",
            "per-row vs int4",
        ],
        [
            [
                f"{r['rows']}",
                f"{r['int4']:.2f}",
                f"{r['tensor']:.2f}",
                f"{r['row']:.2f}",
                f"{r['int4'] / r['row']:.1f}x",
            ]
            for r in forms["speed"]
        ],
    )


def projection_error(forms: dict) -> str:
    """``prefill_forms.py``: each form's error against a float64 product."""
    return _table(
        ["activations (512 rows)", "form", "relative error (Frobenius)", "max abs error"],
        [
            [
                r["activations"],
                r["form"],
                f"{r['relative_error']:.2e}",
                f"{r['max_abs_error']:.3g}",
            ]
            for r in forms["error"]
        ],
    )


def prefill_threshold(forms: dict) -> str:
    """``prefill_forms.py --model``: seconds to prefill S positions on each decoder."""
    return _table(
        ["S", "int4 decoder s", "integer-GEMM decoder s", "int4 / integer GEMM"],
        [
            [
                f"{r['positions']}",
                f"{r['int4']:.3f}",
                f"{r['integer GEMM']:.3f}",
                f"{r['int4'] / r['integer GEMM']:.2f}",
            ]
            for r in forms["suffixes"]
        ],
    )


def accuracy(rows: list[dict], steps: int) -> str:
    """``accuracy.py``: each variant against exact."""
    return _table(
        [
            "model set",
            "case",
            "against exact",
            "max abs logit diff",
            "mean abs logit diff",
            "mean abs logit diff / mean abs logit",
            f"top-1 agreement ({steps} teacher-forced steps)",
            "first token equal",
        ],
        [
            [
                r["model"],
                r["case"],
                r["variant"],
                f"{r['max_abs_logit_diff']:.3f}",
                f"{r['mean_abs_logit_diff']:.4f}",
                f"{r['mean_abs_logit_diff'] / r['mean_abs_logit']:.1%}",
                f"{r['top1_agreement']:.0%}",
                "yes" if r["first_token_equal"] else "no",
            ]
            for r in rows
        ],
    )


def memory(report: dict) -> str:
    """``memory.py``: peak RSS by prompt length."""
    return _table(
        [
            "prompt tokens",
            "precision",
            "RSS after load MiB",
            "peak RSS MiB",
            "peak - loaded MiB",
            "KV cache MiB",
            "one chunk's logits MiB",
        ],
        [
            [
                f"{r['length']:,}",
                r["precision"],
                f"{r['loaded_mib']:,.0f}",
                f"{r['peak_mib']:,.0f}",
                f"{r['peak_mib'] - r['loaded_mib']:,.0f}",
                f"{r['kv_mib']:,.0f}",
                f"{r['chunk_logits_mib']:,.0f}",
            ]
            for r in report["rows"]
        ],
    )
