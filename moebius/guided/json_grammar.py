"""JSON (RFC 8259) as a byte-level pushdown automaton whose states are hashable values.

A state is ``(stack, mode, aux)``: ``stack`` the open containers (a str of "{" and "["),
``mode`` where in the grammar the next byte goes, ``aux`` what a mode needs besides (the
literal's remaining bytes, the hex digits of a \\u escape still due). ``step(state, byte)``
returns the next state or None (the byte cannot follow). Numbers end where the next byte
cannot extend them, so a number byte and the byte after it are read in one step. Being values,
states key the guide's mask cache (moebius/guided/guide.py) and copy for free when a token's
bytes are tried from one.

``OBJECT`` starts where the document must be an object (OpenAI's JSON mode), ``VALUE`` where
any value goes. Inside strings any byte >= 0x80 is taken (UTF-8 is not validated; a decoder
replaces a broken sequence, which still parses); control bytes are not.
"""

from __future__ import annotations

WS = frozenset(b" \t\n\r")
DIGITS = frozenset(b"0123456789")
HEX = frozenset(b"0123456789abcdefABCDEF")
ESCAPES = frozenset(b'"\\/bfnrtu')
LITERALS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}

# modes
VALUE, TOP_OBJECT, OBJ_FIRST, OBJ_KEY, COLON, AFTER, ARR_FIRST, DONE = range(8)
KEY_STR, VAL_STR, KEY_ESC, VAL_ESC, KEY_HEX, VAL_HEX, LITERAL = range(8, 15)
IN_TEXT = frozenset({KEY_STR, VAL_STR, KEY_ESC, VAL_ESC, KEY_HEX, VAL_HEX, LITERAL})
# numbers: after "-", after a leading 0, in the integer's digits, after ".", in the fraction,
# after "e", after the exponent's sign, in the exponent's digits
N_MINUS, N_ZERO, N_INT, N_DOT, N_FRAC, N_E, N_ESIGN, N_EXP = range(15, 23)
NUMBER_ENDS = frozenset((N_ZERO, N_INT, N_FRAC, N_EXP))  # where a number may stop

State = tuple  # (stack: str, mode: int, aux: bytes | int)
OBJECT: State = ("", TOP_OBJECT, 0)
VALUE_START: State = ("", VALUE, 0)


def _after_value(stack: str) -> State:
    return (stack, AFTER if stack else DONE, 0)


def _value(stack: str, b: int) -> State | None:
    """The first byte ``b`` of a value."""
    if b == 0x22:  # "
        return (stack, VAL_STR, 0)
    if b == 0x7B:  # {
        return (stack + "{", OBJ_FIRST, 0)
    if b == 0x5B:  # [
        return (stack + "[", ARR_FIRST, 0)
    if b == 0x2D:  # -
        return (stack, N_MINUS, 0)
    if b == 0x30:
        return (stack, N_ZERO, 0)
    if b in DIGITS:
        return (stack, N_INT, 0)
    rest = LITERALS.get(b)
    return (stack, LITERAL, rest) if rest is not None else None


def _close(stack: str, b: int) -> State | None:
    """``b`` closes the innermost container, if it is that container's closer."""
    if stack and b == (0x7D if stack[-1] == "{" else 0x5D):
        return _after_value(stack[:-1])
    return None


def step(state: State, b: int) -> State | None:
    """The state after byte ``b``, or None where ``b`` cannot come next."""
    stack, mode, aux = state
    if mode == VAL_STR or mode == KEY_STR:
        if b == 0x22:
            return (stack, COLON, 0) if mode == KEY_STR else _after_value(stack)
        if b == 0x5C:
            return (stack, KEY_ESC if mode == KEY_STR else VAL_ESC, 0)
        return state if b >= 0x20 else None
    if mode >= N_MINUS:
        nxt = _number(mode, b)
        if nxt is not None:
            return (stack, nxt, 0)
        if mode not in NUMBER_ENDS:
            return None
        return step(_after_value(stack), b)  # the number ended: b is read after it
    if b in WS and mode not in (KEY_ESC, VAL_ESC, KEY_HEX, VAL_HEX, LITERAL):
        return state
    if mode == VALUE:
        return _value(stack, b)
    if mode == TOP_OBJECT:
        return (stack + "{", OBJ_FIRST, 0) if b == 0x7B else None
    if mode == OBJ_FIRST:
        return (stack, KEY_STR, 0) if b == 0x22 else _close(stack, b)
    if mode == OBJ_KEY:
        return (stack, KEY_STR, 0) if b == 0x22 else None
    if mode == COLON:
        return (stack, VALUE, 0) if b == 0x3A else None
    if mode == AFTER:
        if b == 0x2C:  # ,
            return (stack, OBJ_KEY if stack[-1] == "{" else VALUE, 0)
        return _close(stack, b)
    if mode == ARR_FIRST:
        return _close(stack, b) or _value(stack, b)
    if mode == KEY_ESC or mode == VAL_ESC:
        if b not in ESCAPES:
            return None
        string = KEY_STR if mode == KEY_ESC else VAL_STR
        if b == 0x75:  # u: four hex digits
            return (stack, KEY_HEX if mode == KEY_ESC else VAL_HEX, 4)
        return (stack, string, 0)
    if mode == KEY_HEX or mode == VAL_HEX:
        if b not in HEX:
            return None
        if aux > 1:
            return (stack, mode, aux - 1)
        return (stack, KEY_STR if mode == KEY_HEX else VAL_STR, 0)
    if mode == LITERAL:
        if b != aux[0]:
            return None
        return (stack, LITERAL, aux[1:]) if len(aux) > 1 else _after_value(stack)
    return None  # DONE: only whitespace (above)


def _number(mode: int, b: int) -> int | None:
    """The number's next mode after ``b``, or None where ``b`` does not extend it."""
    digit = b in DIGITS
    if mode == N_MINUS:
        return N_ZERO if b == 0x30 else N_INT if digit else None
    if mode == N_ZERO or mode == N_INT:
        if b == 0x2E:
            return N_DOT
        if b in (0x65, 0x45):
            return N_E
        return N_INT if digit and mode == N_INT else None
    if mode == N_DOT:
        return N_FRAC if digit else None
    if mode == N_FRAC:
        if b in (0x65, 0x45):
            return N_E
        return N_FRAC if digit else None
    if mode == N_E:
        return N_ESIGN if b in (0x2B, 0x2D) else N_EXP if digit else None
    if mode == N_ESIGN or mode == N_EXP:
        return N_EXP if digit else None
    return None


def advance(state, data: bytes, step=step):
    """The state after ``data``, or None where some byte of it cannot come next; ``step``:
    another automaton's (json_schema.Schema.step, guide.Choices.step)."""
    for b in data:
        if state is None:
            return None
        state = step(state, b)
    return state


def complete(state: State | None) -> bool:
    """Whether the bytes read so far are a whole document: every container closed, and the
    value over (a top-level number may end here, as the text does)."""
    if state is None:
        return False
    stack, mode, _ = state
    return not stack and (mode == DONE or mode in NUMBER_ENDS)


def between_tokens(state: State) -> bool:
    """Whether whitespace in ``state`` is JSON's between tokens (not a string's text)."""
    return state[1] not in IN_TEXT
