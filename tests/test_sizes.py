"""`poolformer.sizes`: the one input-size type and its parser (good and bad forms), and how rows name sizes."""

from __future__ import annotations

import pytest

from poolformer import ConfigError, Size
from poolformer.sizes import MIN_SIDE, parse_sizes, row_size


@pytest.mark.parametrize("text, height, width", [
    ("224", 224, 224), ("800x1333", 800, 1333), (" 512X640 ", 512, 640), ("32x32", 32, 32), ("32", 32, 32),
])
def test_good_forms_parse_to_height_and_width(text, height, width):
    size = Size.parse(text)
    assert (size.height, size.width) == (height, width)


@pytest.mark.parametrize("text, message", [
    ("800x", "HEIGHTxWIDTH"), ("x512", "HEIGHTxWIDTH"), ("800*1333", "HEIGHTxWIDTH"), ("800 x 1333", "HEIGHTxWIDTH"),
    ("", "HEIGHTxWIDTH"), ("big", "HEIGHTxWIDTH"), ("-64", "HEIGHTxWIDTH"), ("64.5", "HEIGHTxWIDTH"),
    ("0x512", "at least 32"), ("512x0", "at least 32"), ("16", "at least 32"), ("800x31", "at least 32"),
])
def test_bad_forms_are_one_line_config_errors(text, message):
    with pytest.raises(ConfigError, match=message) as caught:
        Size.parse(text)
    assert "\n" not in str(caught.value)


def test_minimum_side_is_the_four_downsamplings_of_the_models():
    from poolformer.flops import MIN_RESOLUTION
    from poolformer.model import stage_side

    assert MIN_SIDE == MIN_RESOLUTION == 32
    assert stage_side(MIN_SIDE, 3) == 1  # the stride-32 map of the smallest side still has one row


def test_text_and_json_forms_keep_squares_readable_as_before():
    square, rectangle = Size.parse("224"), Size.parse("800x1333")
    assert (str(square), str(rectangle)) == ("224", "800x1333")
    assert square.json_fields() == {"resolution": 224, "height": 224, "width": 224}  # an int, as old rows had
    assert rectangle.json_fields() == {"resolution": "800x1333", "height": 800, "width": 1333}
    assert (square.img_size, rectangle.img_size) == (224, (800, 1333))
    assert Size.parse(str(rectangle)) == rectangle and Size.of(rectangle.resolution) == rectangle


def test_of_takes_what_callers_hold():
    assert Size.of(224) == Size.of("224") == Size.of((224, 224)) == Size.of(Size(224, 224)) == Size(224, 224)
    for bad in (True, 2.5, None, (1, 2, 3)):
        with pytest.raises(ConfigError):
            Size.of(bad)
    with pytest.raises(ConfigError, match="positive"):
        Size(0, 512)


def test_lists_keep_order_without_repeats():
    assert parse_sizes("800x1333,512,512") == [Size(800, 1333), Size(512, 512)]
    with pytest.raises(ConfigError):
        parse_sizes("224,,384")


def test_row_size_reads_old_and_new_rows():
    assert row_size({"resolution": 224}) == row_size({"resolution": 224, "height": 224, "width": 224})
    assert row_size({"resolution": "800x1333"}) == Size(800, 1333)
    assert row_size({"resolution": "800x1333", "height": 800, "width": 1333}) == Size(800, 1333)
