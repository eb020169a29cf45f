from framework.data.windows import WindowSpec, build_windows, make_windows, tokenize

__all__ = ["WindowSpec", "build_windows", "make_windows", "tokenize"]
