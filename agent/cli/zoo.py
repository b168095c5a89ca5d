"""``autoexplain zoo build|show|path``: the toy world."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from autoexplain.agent.cli.common import DbOpt, build_zoo, console, open_store, record_zoo, show_zoo
from autoexplain.tools.errors import InputError

zoo_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                      help="The toy world: a corpus, a trained GPT-2, SAEs and task files.")


@zoo_app.command("build")
def zoo_build(name: Annotated[str, typer.Option(help="which toy world (small, tiny)")] = "small",
              rebuild: Annotated[bool, typer.Option(help="train it from scratch (minutes) instead of using the cache "
                                                         "or the package's shipped copy")] = False,
              db: DbOpt = None) -> None:
    """Get the toy world (cached; unpacked from the package's shipped copy on first use, in seconds) and record it
    in the database. --rebuild trains it from scratch."""
    from autoexplain.tools.zoo import get_spec

    get_spec(name)  # validate before anything is written
    store = open_store(db)
    built = build_zoo(name, rebuild=rebuild)
    run_id, _, _ = record_zoo(store, built, kind="zoo")
    store.finish_run(run_id, "done", {"task_accuracy": built.manifest["task_accuracy"],
                                      "timings": built.manifest["timings"]})
    show_zoo(built)
    console().print(f"database: {store.path.resolve()}")


@zoo_app.command("pack")
def zoo_pack(name: Annotated[str, typer.Option(help="which toy world (small, tiny)")] = "small",
             out: Annotated[Path, typer.Option(help="folder to write NAME-FINGERPRINT.tar.xz into (the package "
                                                    "ships tools/zoo_data/)")] = Path("tools/zoo_data")) -> None:
    """Write a built toy world as the archive the package ships (for maintainers, after zoo build --rebuild)."""
    from autoexplain.tools.zoo import get_spec, pack, zoo_root

    if not (zoo_root(get_spec(name)) / "manifest.json").exists():
        raise InputError(f"toy world {name!r} is not built yet: run autoexplain zoo build --name {name} --rebuild")
    print(pack(build_zoo(name), out))


@zoo_app.command("show")
def zoo_show(name: Annotated[str, typer.Option(help="which toy world (small, tiny)")] = "small") -> None:
    """Show a built toy world: sizes, task accuracy, SAEs and where its files are."""
    from autoexplain.tools.zoo import get_spec, zoo_root

    if not (zoo_root(get_spec(name)) / "manifest.json").exists():
        raise InputError(f"toy world {name!r} is not built yet: run autoexplain zoo build --name {name}")
    show_zoo(build_zoo(name))



@zoo_app.command("path")
def zoo_path(name: Annotated[str, typer.Option(help="which toy world (small, tiny)")] = "small") -> None:
    """Print the folder of a toy world (building it first if needed), for use in shell commands such as
    autoexplain harvest ... --dataset "$(autoexplain zoo path)/corpus/train.txt"."""
    from autoexplain.tools.zoo import get_spec

    get_spec(name)
    print(build_zoo(name).root)


