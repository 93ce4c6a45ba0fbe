"""The synthetic vocabulary: the words the tiny tokenizers know and the prompt data is written in."""

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["square", "circle", "triangle", "star", "box", "ring"]
PLACES = ["left", "right", "top", "bottom", "center", "corner"]
WORDS = COLORS + SHAPES + PLACES + [
    "copy", "repeat", ":", "the", "a", "is", "in", "on", "of", "and", "with", "at", "object", "region",
    "small", "large", "bright", "dark", "describe", "segment", "this", "masked", "please", "it", ".", ",",
] + [str(i) for i in range(10)]
