"""Documentation that is tested: README.md and docs/*.md say only what the code does.

- **Shell blocks** (```bash, ```sh, ```shell): every `advmnist ...` command in them, at the start of a
  line or after `&&`, `||`, `;`, `|` or leading `VAR=value` assignments, is parsed by click exactly as
  the command line would be (`main.make_context`, then each subcommand's `make_context`), so the
  command must exist, every option must exist and every value must pass its type, choices, range and
  callback; the command's body (training, attacks) never runs. `# comments`, `\\` continuations,
  redirections and here-document bodies are handled. Not checked, and listed by
  `test_skipped_shell_commands_are_only_the_expected_ones`: a command with a shell substitution (`$VAR`,
  `$(...)`, backticks), whose value the test cannot know, and a shell-completion call
  (`_ADVMNIST_COMPLETE=... advmnist`), which click answers before parsing any option.
- **Python blocks** (```python): each runs in a fresh interpreter (`python -c`), in an empty temporary
  directory, with one torch thread, and must exit 0 within `PYTHON_TIMEOUT_S`.
- **docs/cli.md** is regenerated in memory by `docs/make_cli.py` and must equal the committed page, and
  the options it lists for each command must be the ones `advmnist CMD --help` shows.

The convention: a block may carry one directive, an HTML comment on the line right above its opening
fence (invisible on a rendered page):

    <!-- doc-test: skip (why) -->              the block is not checked (a shell block) or not run (Python)
    <!-- doc-test: setup STATEMENTS -->        Python statements run first, in the same interpreter

The setup statements are prepended to the block's code, so they can define what a fragment assumes
(`model`, `x`, `y`, a `MyNet` and its `weights.pt`) and make the work small without changing what the
reader sees: make `advmnist.data.load_mnist` return `.subset(...)` of the data, or swap an ensemble of
`advmnist.robustness.ENSEMBLES` for the quick one. Keep each block's run under ~20 s on one thread. Any
other `doc-test:` comment, or one that is not right above a fence, fails `test_directives_are_well_formed`.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from advmnist.cli import main

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL = {"bash", "sh", "shell"}
PYTHON_TIMEOUT_S = 120  # a hung block fails instead of stalling the suite; the blocks take a few seconds each

_FENCE_OPEN = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([^\s`]*)")
_DIRECTIVE = re.compile(r"^\s*<!--\s*doc-test:\s*(.*?)\s*-->\s*$")
_DIRECTIVE_FORM = re.compile(r"^(skip)(?:\s+\((.+)\))?$|^(setup)\s+(\S.*)$", re.S)


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    directive: str | None  # the text after "doc-test:", if the line above the fence has one

    @property
    def name(self) -> str:
        return self.page.relative_to(REPO).as_posix() if self.page.is_relative_to(REPO) else self.page.name

    @property
    def where(self) -> str:
        return f"{self.name}:{self.line}"

    def parsed_directive(self) -> tuple[str, str] | None:
        """("skip", reason) or ("setup", statements); ValueError for anything else."""
        if self.directive is None:
            return None
        m = _DIRECTIVE_FORM.match(self.directive)
        if m is None:
            raise ValueError(f"{self.where}: unknown directive {self.directive!r}; expected "
                             "'doc-test: skip (why)' or 'doc-test: setup STATEMENTS'")
        return ("skip", m.group(2) or "") if m.group(1) else ("setup", m.group(4))


def blocks(page: Path, text: str | None = None) -> list[Block]:
    """Every fenced block of a Markdown page, with the directive on the line above its fence."""
    lines = (page.read_text(encoding="utf-8") if text is None else text).splitlines()
    found, i = [], 0
    while i < len(lines):
        m = _FENCE_OPEN.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang, start = m.group(1), m.group(2).lower(), i
        i += 1
        body = []
        while i < len(lines) and not (lines[i].lstrip(" ").startswith(fence)
                                      and lines[i].strip().strip(fence[0]) == ""):
            body.append(lines[i])
            i += 1
        above = _DIRECTIVE.match(lines[start - 1]) if start else None
        found.append(Block(page, start + 1, lang, "\n".join(body) + "\n", above.group(1) if above else None))
        i += 1
    return found


def directives_out_of_place(page: Path, text: str | None = None) -> list[str]:
    """`doc-test:` comments that are not right above a fence."""
    lines = (page.read_text(encoding="utf-8") if text is None else text).splitlines()
    return [f"{page.name}:{n + 1}" for n, line in enumerate(lines)
            if "doc-test:" in line and _DIRECTIVE.match(line)
            and not (n + 1 < len(lines) and _FENCE_OPEN.match(lines[n + 1]))]


ALL_BLOCKS = [b for page in PAGES for b in blocks(page)]


# ---- shell blocks: every advmnist command parses -------------------------------------------------

_SEPARATORS = {"&&", "||", ";", "|", "&", "(", ")", ";;", "|&"}
_REDIRECTS = {">", ">>", "<", "<<", "<<-", ">&", "<&", "&>", ">|", "<<<"}


@dataclass
class Command:
    where: str
    text: str  # the logical line, continuations joined
    args: list[str]  # after `advmnist`
    skipped: str = ""  # why it is not checked
    error: str = ""  # why the line could not be split into words


def commands(block: Block) -> list[Command]:
    """The `advmnist` commands of a shell block."""
    found = []
    lines = block.code.splitlines()
    n, heredoc = 0, None
    while n < len(lines):
        first = n
        line = lines[n]
        n += 1
        if heredoc is not None:  # a here-document's body is input, not commands
            if line.strip() == heredoc:
                heredoc = None
            continue
        while line.rstrip().endswith("\\") and n < len(lines):
            line = line.rstrip()[:-1] + " " + lines[n]
            n += 1
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, "#"
        where = f"{block.name}:{block.line + first + 1}"
        try:
            tokens = list(lexer)
        except ValueError as exc:  # an unclosed quote: reported by test_documented_command_parses
            if "advmnist" in line:
                found.append(Command(where, " ".join(line.split()), [], error=f"cannot split into words: {exc}"))
            continue
        for k, tok in enumerate(tokens):
            if tok in ("<<", "<<-") and k + 1 < len(tokens):
                heredoc = tokens[k + 1]
        for words in _split(tokens):
            env = []
            while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
                env.append(words.pop(0))
            if not words or words[0] != "advmnist":
                continue
            args = _without_redirections(words[1:])
            skipped = ""
            if any(e.startswith("_ADVMNIST_COMPLETE=") for e in env):
                skipped = "shell completion"
            elif any("$" in a or "`" in a for a in args):
                skipped = "shell substitution"
            found.append(Command(where, " ".join(line.split()), args, skipped))
    return found


def _split(tokens: list[str]) -> list[list[str]]:
    out, current = [], []
    for tok in tokens:
        if tok in _SEPARATORS:
            out.append(current)
            current = []
        else:
            current.append(tok)
    return out + [current]


def _without_redirections(words: list[str]) -> list[str]:
    out, k = [], 0
    while k < len(words):
        if words[k] in _REDIRECTS:
            k += 2  # the operator and its target
            continue
        if words[k].isdigit() and k + 1 < len(words) and words[k + 1] in _REDIRECTS:
            k += 1  # the 2 of 2> file
            continue
        out.append(words[k])
        k += 1
    return out


def parse_error(args: list[str], group: click.Group = main) -> str | None:
    """None if click accepts `advmnist ARGS` (commands, options, values, callbacks), else why not.

    Each level is parsed with `make_context` as click's own `Group.invoke` does, and the contexts are
    closed again; no command body runs."""
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(contextlib.redirect_stdout(io.StringIO()))  # what --help would print
            ctx = stack.enter_context(group.make_context("advmnist", list(args)))
            while isinstance(ctx.command, click.Group):
                protected = getattr(ctx, "_protected_args", None)
                rest = [*(ctx.protected_args if protected is None else protected), *ctx.args]
                if not rest:
                    raise click.UsageError("missing command", ctx)
                name, sub, rest = ctx.command.resolve_command(ctx, rest)
                ctx = stack.enter_context(sub.make_context(name, rest, parent=ctx))
    except click.exceptions.Exit as exc:  # --help, --version: accepted
        return None if exc.exit_code == 0 else f"exit code {exc.exit_code}"
    except click.ClickException as exc:
        return exc.format_message()
    return None


def _skipped(block: Block) -> bool:
    try:
        return (block.parsed_directive() or ("",))[0] == "skip"
    except ValueError:  # reported by test_directives_are_well_formed
        return False


SHELL_COMMANDS = [c for b in ALL_BLOCKS if b.lang in SHELL and not _skipped(b) for c in commands(b)]
CHECKED = [c for c in SHELL_COMMANDS if not c.skipped]


def test_the_pages_have_commands_to_check():
    assert len(CHECKED) >= 15, [c.text for c in CHECKED]


@pytest.mark.parametrize("command", CHECKED, ids=[c.where for c in CHECKED])
def test_documented_command_parses(command):
    error = command.error or parse_error(command.args)
    assert error is None, f"{command.where}: `{command.text}`: {error}"


def test_skipped_shell_commands_are_only_the_expected_ones():
    """Only the fish completion line (`_ADVMNIST_COMPLETE=fish_source advmnist > ...`) is left out; a new
    skip is a choice to make here, not an accident."""
    skipped = [(c.where, c.skipped) for c in SHELL_COMMANDS if c.skipped]
    assert [why for _, why in skipped] == ["shell completion"], skipped


FAKE_PAGE = """
```bash
advmnist models
advmnist train --model improved-bn --no-such-option 3      # a renamed or removed option
advmnist attack --method pgd --norm l3                     # a value outside the choices
advmnist train --model improved-bnn                        # a near miss, caught by the CLI's callback
advmnist evaluate --robust --eps nan                       # a value out of range
advmnist experiment runn experiments/report001.toml        # an unknown command
python -m venv .venv && advmnist train --epochs 0          # the command after &&
advmnist attack --method pgd \\
    --eps 0.1,x                                            # a continuation line
advmnist train --model "$MODEL"                            # a substitution: skipped
advmnist train --help
```
"""


def test_the_check_reports_a_wrong_option_or_value(tmp_path):
    """The check is not vacuous: a fake page's wrong commands are each reported with click's reason."""
    page = tmp_path / "fake.md"
    found = commands(blocks(page, FAKE_PAGE)[0])
    assert [c.skipped for c in found] == [""] * 8 + ["shell substitution", ""]
    errors = [parse_error(c.args) for c in found if not c.skipped]
    assert errors[0] is None and errors[-1] is None  # `models`; `--help` is accepted without running
    expected = [("no such option", "--no-such-option"), ("--norm", "'l3' is not one of"),
                ("--model", "unknown model 'improved-bnn'", "did you mean 'improved-bn'"),
                ("--eps", "eps must be >= 0"), ("no such command", "runn"), ("--epochs", "an integer >= 1"),
                ("--eps", "numbers separated by commas")]
    for error, texts in zip(errors[1:-1], expected, strict=True):
        assert error is not None and all(text in error.lower() for text in texts), (texts, error)
    assert found[7].args == ["attack", "--method", "pgd", "--eps", "0.1,x"]


# ---- python blocks: each runs --------------------------------------------------------------------

PYTHON = [b for b in ALL_BLOCKS if b.lang in ("python", "py")]


def test_the_pages_have_python_to_run():
    assert len(PYTHON) >= 5


def _directive_errors(found: list[Block]) -> list[str]:
    errors = []
    for b in found:
        try:
            b.parsed_directive()
        except ValueError as exc:
            errors.append(str(exc))
    return errors


def test_directives_are_well_formed():
    assert _directive_errors(ALL_BLOCKS) == []
    misplaced = [w for page in PAGES for w in directives_out_of_place(page)]
    assert misplaced == [], f"doc-test directives not right above a fence: {misplaced}"


def test_directive_forms(tmp_path):
    page = tmp_path / "fake.md"
    text = ("<!-- doc-test: skip (needs a GPU) -->\n```python\n1/0\n```\n"
            "<!-- doc-test: setup import torch; x = torch.zeros(1) -->\n```python\nprint(x)\n```\n"
            "<!-- doc-test: setpu x = 1 -->\n```python\nx\n```\n"
            "<!-- doc-test: skip -->\n\n```bash\nadvmnist models\n```\n")
    found = blocks(page, text)
    assert [b.parsed_directive() for b in found[:2]] == [("skip", "needs a GPU"),
                                                         ("setup", "import torch; x = torch.zeros(1)")]
    assert _directive_errors(found) == ["fake.md:10: unknown directive 'setpu x = 1'; expected "
                                        "'doc-test: skip (why)' or 'doc-test: setup STATEMENTS'"]
    assert found[3].directive is None and directives_out_of_place(page, text) == ["fake.md:13"]


def run_python(block: Block, cwd: Path) -> subprocess.CompletedProcess:
    directive = block.parsed_directive()
    setup = directive[1] if directive and directive[0] == "setup" else ""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, "-c", setup + "\n" + block.code], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=PYTHON_TIMEOUT_S)


@pytest.mark.parametrize("block", PYTHON, ids=[b.where for b in PYTHON])
def test_documented_python_runs(block, tmp_path):
    directive = block.parsed_directive()
    if directive and directive[0] == "skip":
        pytest.skip(f"{block.where}: {directive[1] or 'doc-test: skip'}")
    done = run_python(block, tmp_path)
    assert done.returncode == 0, (f"{block.where}: the block failed (line 1 of the traceback is the setup line, "
                                  f"line 2 the block's first)\n{done.stderr[-3000:]}")


def test_a_failing_python_block_is_reported(tmp_path):
    page = tmp_path / "fake.md"
    fake = blocks(page, "<!-- doc-test: setup x = 1 -->\n```python\nassert x == 2, 'wrong'\n```\n")[0]
    assert fake.parsed_directive() == ("setup", "x = 1")
    done = run_python(fake, tmp_path)
    assert done.returncode != 0 and "wrong" in done.stderr


# ---- docs/cli.md: generated from click, and what --help shows -----------------------------------

CLI_PAGE = REPO / "docs" / "cli.md"


def _generator():
    spec = importlib.util.spec_from_file_location("make_cli", REPO / "docs" / "make_cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_is_up_to_date():
    generator = _generator()
    expected = generator.render()
    committed = CLI_PAGE.read_text(encoding="utf-8") if CLI_PAGE.exists() else ""
    if committed != expected:
        diff = "".join(list(difflib.unified_diff(committed.splitlines(True), expected.splitlines(True),
                                                 "docs/cli.md (committed)", "docs/cli.md (from the commands)"))[:60])
        pytest.fail(f"docs/cli.md is out of date: run `{generator.COMMAND}`\n{diff}")


_OPTION_NAME = re.compile(r"(?<![\w-])--?[A-Za-z][\w-]*")


def _help_options(output: str) -> set[str]:
    """Option names of a --help page's Options section (their lines start with two spaces and a dash)."""
    section = output.split("\nOptions:\n", 1)[1].split("\nCommands:\n", 1)[0]
    names = set()
    for line in section.splitlines():
        if re.match(r"^  -", line):
            names |= set(_OPTION_NAME.findall(re.split(r"\s{2,}", line.strip())[0]))
    return names


def _page_options(page: str) -> dict[str, set[str]]:
    """Command path -> option names listed in its section of docs/cli.md."""
    found = {}
    for section in re.split(r"^## ", page, flags=re.M)[1:]:
        path, _, body = section.partition("\n")
        options = body.split("\nOptions:\n", 1)[1] if "\nOptions:\n" in body else ""
        found[path.strip()] = {n for label in re.findall(r"^- \*\*`([^`]+)`\*\*", options, flags=re.M)
                               for n in _OPTION_NAME.findall(label)}
    return found


def test_cli_reference_lists_the_options_help_shows():
    listed = _page_options(_generator().render())
    assert "advmnist train" in listed and "advmnist experiment run" in listed
    every = {"advmnist"}
    stack = [(main, ["advmnist"])]
    while stack:  # every command path click knows, to compare with the page's sections
        group, path = stack.pop()
        for name in group.list_commands(click.Context(group)):
            sub = group.get_command(click.Context(group), name)
            every.add(" ".join([*path, name]))
            if isinstance(sub, click.Group):
                stack.append((sub, [*path, name]))
    assert set(listed) == every
    for path, options in listed.items():
        result = CliRunner().invoke(main, [*path.split()[1:], "--help"])
        assert result.exit_code == 0, result.output
        shown = _help_options(result.output)
        assert options == shown, (f"{path}: docs/cli.md lists {sorted(options - shown)} that --help does not "
                                  f"show, and misses {sorted(shown - options)}")
        assert "--help" in options


def test_cli_reference_anchors_exist():
    page = CLI_PAGE.read_text(encoding="utf-8")
    slugs = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
             for h in re.findall(r"^#+ (.+)$", page, flags=re.M)}
    missing = sorted(set(re.findall(r"\]\(#([^)]+)\)", page)) - slugs)
    assert missing == [], f"docs/cli.md links to headings it does not have: {missing}"
