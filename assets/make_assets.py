"""Draw the demo's example images (deterministic; no downloads, no font files).

    python assets/make_assets.py

Each picture gives the model something concrete to read or describe: numbers on a chart, prices
on a receipt, the steps of a diagram, the objects in a scene. Text uses Pillow's built-in
scalable font (`ImageFont.load_default(size=...)`, Pillow >= 10.1), so the output is the same on
every machine with the same Pillow.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

HERE = Path(__file__).resolve().parent
BLACK, GREY, LIGHT_GREY = (20, 20, 20), (110, 110, 110), (225, 225, 225)


def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def text_centred(draw: ImageDraw.ImageDraw, centre: tuple[float, float], text: str, size: int,
                 fill=BLACK) -> None:
    """Text centred on a point, so labels sit on their bars and boxes whatever their length."""
    draw.text(centre, text, fill=fill, font=font(size), anchor="mm")


def text_right(draw: ImageDraw.ImageDraw, right_top: tuple[float, float], text: str, size: int,
               fill=BLACK) -> None:
    """Text ending at a point, so a column of prices lines up on the decimal places."""
    draw.text(right_top, text, fill=fill, font=font(size), anchor="ra")


def chart() -> Image.Image:
    """A bar chart of monthly sales with a title, axis titles, ticks and a value on each bar."""
    image = Image.new("RGB", (640, 460), "white")
    draw = ImageDraw.Draw(image)
    text_centred(draw, (340, 26), "Monthly sales, first half of 2025", 22)
    months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun"]
    sales = [42, 55, 38, 71, 64, 80]
    left, right, bottom, per_unit = 80, 610, 380, 3  # 100 k$ is 300 px tall
    for tick in range(0, 101, 20):
        y = bottom - tick * per_unit
        draw.line((left, y, right, y), fill=LIGHT_GREY)
        draw.line((left - 6, y, left, y), fill=BLACK, width=2)
        text_right(draw, (left - 10, y - 8), str(tick), 14)
    draw.line((left, 70, left, bottom), fill=BLACK, width=2)
    draw.line((left, bottom, right, bottom), fill=BLACK, width=2)
    for i, (month, value) in enumerate(zip(months, sales)):
        centre = left + 48 + i * 88
        top = bottom - value * per_unit
        draw.rectangle((centre - 28, top, centre + 28, bottom), fill=(66, 133, 244))
        text_centred(draw, (centre, top - 12), str(value), 15)
        text_centred(draw, (centre, bottom + 16), month, 16)
    text_centred(draw, (345, 436), "Month", 18)
    axis_title = Image.new("RGB", (220, 30), "white")
    text_centred(ImageDraw.Draw(axis_title), (110, 15), "Sales (thousand $)", 18)
    image.paste(axis_title.rotate(90, expand=True), (8, 115))
    return image


def receipt() -> Image.Image:
    """A café receipt: shop, items with quantities and prices, subtotal, tax, total, payment."""
    width = 360
    image = Image.new("RGB", (width, 490), (252, 251, 245))
    draw = ImageDraw.Draw(image)
    text_centred(draw, (width / 2, 34), "CORNER CAFE", 28)
    text_centred(draw, (width / 2, 64), "12 Market Street, Springfield", 14, GREY)
    text_centred(draw, (width / 2, 84), "2025-03-14   09:41   Table 7", 14, GREY)
    items = [("2 x Cappuccino", 7.60), ("1 x Croissant", 2.50), ("1 x Apple juice", 3.20),
             ("1 x Club sandwich", 7.90), ("1 x Cheesecake", 4.60)]
    y = 118
    for name, price in items:
        draw.text((28, y), name, fill=BLACK, font=font(17))
        text_right(draw, (width - 28, y), f"{price:.2f}", 17)
        y += 32
    subtotal = sum(price for _, price in items)
    tax = round(subtotal * 0.08, 2)
    draw.line((28, y + 4, width - 28, y + 4), fill=BLACK, width=1)
    for label, amount in (("Subtotal", subtotal), ("Tax 8%", tax)):
        y += 16
        draw.text((28, y), label, fill=GREY, font=font(15))
        text_right(draw, (width - 28, y), f"{amount:.2f}", 15, GREY)
        y += 10
    draw.line((28, y + 22, width - 28, y + 22), fill=BLACK, width=2)
    draw.text((28, y + 34), "TOTAL", fill=BLACK, font=font(22))
    text_right(draw, (width - 28, y + 34), f"$ {subtotal + tax:.2f}", 22)
    draw.text((28, y + 80), "Paid by card  **** 4821", fill=GREY, font=font(14))
    text_centred(draw, (width / 2, y + 130), "Thank you for visiting!", 16)
    return image


def diagram() -> Image.Image:
    """A left-to-right flow of four labelled boxes joined by arrows, with a caption per arrow."""
    image = Image.new("RGB", (640, 300), (245, 248, 255))
    draw = ImageDraw.Draw(image)
    text_centred(draw, (320, 50), "How a question becomes an answer", 22)
    steps = [("Upload", (255, 205, 110)), ("Queue", (160, 210, 255)), ("Engine", (170, 230, 170)),
             ("Stream", (240, 170, 200))]
    captions = ["validate", "batch", "tokens"]
    box, gap = 104, 68
    for i, (label, colour) in enumerate(steps):
        x = 10 + i * (box + gap)
        draw.rounded_rectangle((x, 115, x + box, 195), radius=14, fill=colour, outline=BLACK, width=2)
        text_centred(draw, (x + box / 2, 155), label, 22)
        if i < len(captions):
            end = x + box + gap - 1
            draw.line((x + box + 2, 155, end - 8, 155), fill=BLACK, width=3)
            draw.polygon([(end, 155), (end - 10, 148), (end - 10, 162)], fill=BLACK)
            text_centred(draw, (x + box + gap / 2, 138), captions[i], 13, GREY)
    text_centred(draw, (320, 245), "Each step runs for many users at once.", 16, GREY)
    return image


def scene() -> Image.Image:
    """A landscape with things to name and count: sky, sun, clouds, mountains, a house, a tree."""
    image = Image.new("RGB", (640, 420), (135, 200, 245))
    draw = ImageDraw.Draw(image)
    draw.ellipse((500, 40, 580, 120), fill=(255, 220, 60))
    for x, y in ((70, 60), (300, 40)):
        for dx, dy, r in ((0, 10, 22), (25, 0, 28), (55, 10, 22)):
            draw.ellipse((x + dx - r, y + dy - r, x + dx + r, y + dy + r), fill="white")
    draw.polygon([(0, 300), (160, 130), (320, 300)], fill=(120, 130, 150))
    draw.polygon([(220, 300), (420, 90), (620, 300)], fill=(100, 110, 130))
    draw.polygon([(381, 131), (420, 90), (459, 131), (440, 124), (420, 134), (400, 124)], fill="white")
    draw.rectangle((0, 300, 640, 420), fill=(90, 170, 80))
    draw.polygon([(140, 340), (165, 340), (230, 420), (150, 420)], fill=(200, 180, 130))  # path
    draw.rectangle((90, 250, 210, 340), fill=(200, 120, 80))  # house
    draw.polygon([(78, 252), (150, 195), (222, 252)], fill=(150, 40, 40))
    draw.rectangle((138, 290, 165, 340), fill=(90, 60, 30))
    draw.rectangle((104, 268, 128, 290), fill=(250, 240, 180), outline=(90, 60, 30), width=2)
    draw.rectangle((176, 268, 200, 290), fill=(250, 240, 180), outline=(90, 60, 30), width=2)
    draw.rectangle((442, 260, 458, 345), fill=(110, 70, 30))  # tree
    draw.ellipse((405, 185, 495, 275), fill=(40, 130, 50))
    return image


def favicon() -> Image.Image:
    """The page's tab icon: a picture frame with a speech bubble, readable at 16 px."""
    image = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.rounded_rectangle((2, 6, 50, 46), radius=8, fill=(79, 70, 229))
    draw.polygon(((8, 40), (20, 24), (30, 36), (38, 28), (46, 40)), fill="white")
    draw.ellipse((32, 12, 42, 22), fill=(253, 224, 71))
    draw.rounded_rectangle((30, 34, 62, 58), radius=7, fill=(236, 72, 153))
    for x in (38, 46, 54):
        draw.ellipse((x - 2, 44, x + 2, 48), fill="white")
    return image


def main() -> None:
    for name, draw in (("chart", chart), ("receipt", receipt), ("diagram", diagram), ("scene", scene),
                       ("favicon", favicon)):
        draw().save(HERE / f"{name}.png", optimize=True)


if __name__ == "__main__":
    main()
