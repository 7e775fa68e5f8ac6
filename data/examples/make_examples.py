"""Draw the example images the app ships with (run from anywhere; writes next to this file).

    python data/examples/make_examples.py

Everything is drawn here with Pillow: no photographs, no third-party artwork. Text uses Pillow's
built-in font (Aileron Regular, CC0, bundled with Pillow >= 10.1). Output is deterministic.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

HERE = Path(__file__).resolve().parent


def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def bar_chart() -> Image.Image:
    """Monthly rainfall in a made-up town: a chart the model can read numbers from."""
    months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun"]
    rain_mm = [78, 52, 61, 95, 40, 23]
    image = Image.new("RGB", (800, 560), "white")
    draw = ImageDraw.Draw(image)
    draw.text(
        (400, 34), "Monthly rainfall in Lindenfeld, 2023", font=font(30), fill="#222", anchor="mm"
    )
    left, right, top, bottom = 110, 760, 90, 470
    for mm in range(0, 101, 20):  # grid lines and y labels
        y = bottom - (bottom - top) * mm / 100
        draw.line((left, y, right, y), fill="#ddd", width=1)
        draw.text((left - 12, y), str(mm), font=font(18), fill="#444", anchor="rm")
    draw.line((left, top, left, bottom), fill="#444", width=2)
    draw.line((left, bottom, right, bottom), fill="#444", width=2)
    draw.text((36, (top + bottom) / 2), "mm", font=font(20), fill="#444", anchor="mm")
    slot = (right - left) / len(months)
    for i, (month, mm) in enumerate(zip(months, rain_mm, strict=True)):
        x0 = left + i * slot + slot * 0.2
        x1 = left + (i + 1) * slot - slot * 0.2
        y = bottom - (bottom - top) * mm / 100
        draw.rectangle((x0, y, x1, bottom), fill="#3b6fd4" if mm != max(rain_mm) else "#e0663a")
        draw.text(((x0 + x1) / 2, y - 14), str(mm), font=font(18), fill="#222", anchor="mm")
        draw.text(((x0 + x1) / 2, bottom + 22), month, font=font(20), fill="#222", anchor="mm")
    draw.text(
        (400, 530), "Source: invented numbers for a demo", font=font(16), fill="#777", anchor="mm"
    )
    return image


def scene() -> Image.Image:
    """A house, a tree, the sun and a red ball on the lawn: things to name and count."""
    image = Image.new("RGB", (800, 560), "#9fd3f5")
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 380, 800, 560), fill="#5cae4a")  # lawn
    draw.ellipse((640, 40, 740, 140), fill="#ffd23f")  # sun
    for x0, y0 in ((90, 80), (300, 50)):  # two clouds
        for dx, dy, r in ((0, 20, 34), (40, 0, 42), (85, 18, 34)):
            draw.ellipse(
                (x0 + dx - r, y0 + dy - r + 30, x0 + dx + r, y0 + dy + r + 30), fill="white"
            )
    draw.rectangle((170, 250, 420, 430), fill="#f2e3c6", outline="#6b4f2a", width=3)  # house
    draw.polygon(((150, 255), (295, 150), (440, 255)), fill="#c0392b")  # roof
    draw.rectangle((270, 340, 320, 430), fill="#7a4b24")  # door
    draw.rectangle((195, 285, 245, 330), fill="#cde8ff", outline="#6b4f2a", width=3)
    draw.rectangle((345, 285, 395, 330), fill="#cde8ff", outline="#6b4f2a", width=3)
    draw.rectangle((585, 300, 615, 440), fill="#7a4b24")  # tree trunk
    draw.ellipse((520, 190, 680, 340), fill="#2e7d32")  # tree crown
    draw.ellipse((470, 470, 520, 520), fill="#e53935")  # ball
    return image


def ui_mock() -> Image.Image:
    """A sign-in dialog, drawn like a screenshot: fields, a checkbox, buttons, a link."""
    image = Image.new("RGB", (800, 560), "#eceff3")
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, 800, 36), fill="#2b2f36")  # window title bar
    for i, colour in enumerate(("#ff5f57", "#febc2e", "#28c840")):
        draw.ellipse((14 + i * 22, 11, 28 + i * 22, 25), fill=colour)
    draw.text((400, 18), "Acme Notes", font=font(16), fill="#ddd", anchor="mm")
    draw.rounded_rectangle((200, 80, 600, 520), radius=14, fill="white", outline="#d0d5dc")
    draw.text((400, 125), "Sign in to Acme Notes", font=font(26), fill="#1d2330", anchor="mm")
    for label, y in (("Email", 170), ("Password", 255)):
        draw.text((235, y), label, font=font(17), fill="#444")
        draw.rounded_rectangle(
            (235, y + 26, 565, y + 66), radius=6, fill="#f7f8fa", outline="#b8c0cc"
        )
    draw.text((250, 216), "ada@example.com", font=font(18), fill="#222", anchor="lm")
    for i in range(8):  # the masked password (the built-in font has no bullet glyph)
        draw.ellipse((252 + i * 16, 296, 262 + i * 16, 306), fill="#222")
    draw.rectangle((235, 355, 253, 373), outline="#666", width=2)  # checkbox, ticked
    draw.line((239, 364, 244, 369, 250, 358), fill="#2f6fe4", width=3)
    draw.text((265, 364), "Remember me", font=font(17), fill="#333", anchor="lm")
    draw.rounded_rectangle((235, 395, 565, 440), radius=8, fill="#2f6fe4")
    draw.text((400, 417), "Sign in", font=font(20), fill="white", anchor="mm")
    draw.rounded_rectangle((235, 452, 565, 492), radius=8, fill="white", outline="#b8c0cc")
    draw.text((400, 472), "Create an account", font=font(18), fill="#2f6fe4", anchor="mm")
    draw.text((400, 540), "Forgot your password?", font=font(16), fill="#2f6fe4", anchor="mm")
    return image


def main() -> None:
    for name, draw in (("bar_chart", bar_chart), ("scene", scene), ("sign_in", ui_mock)):
        path = HERE / f"{name}.png"
        draw().save(path, optimize=True)
        print(f"{path.name}: {path.stat().st_size // 1024} KB")


if __name__ == "__main__":
    main()
