"""Command line: ``python -m balrs [--check] [--listen ADDR] [--strategy NAME] lb.ini``."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import resource
import sys
from typing import Callable, List, Optional, Sequence

from . import __version__
from .accesslog import RateLimitFilter
from .listener import ListenError
from .pystrategy import check_strategies
from .tls import load_tls
from .config import DEFAULT_POOL, STRATEGIES, Config, ConfigError, PoolConfig, load, parse_address

__all__ = ["main", "build_parser"]

log = logging.getLogger("balrs")

LOG_FORMAT = "%(asctime)s balrs[%(process)d] %(levelname)s: %(message)s"

# The subcommands main() dispatches before the balancer's own arguments, as `--help` lists them:
# (usage after "balrs ", what it does). Add a command here when main() learns it.
SUBCOMMANDS = [
    ("status [ADMIN_ADDR] [--watch]", "live report of a running balrs ([admin])"),
    ("demo", "a self-contained demo on 127.0.0.1"),
    ("zipapp [-o balrs.pyz]", "build balrs as one runnable file"),
    ('explain lb.ini "GET /path" [--host H] [--admin ADDR]', "why a request goes to the backend it goes to"),
    ("simulate lb.ini TRACE [--strategy A,B]", "replay traffic through strategies on a virtual clock"),
]


def _commands_epilog() -> str:
    width = max(len(usage) for usage, _ in SUBCOMMANDS) + len("balrs ")
    return "commands:\n" + "\n".join("  %-*s  %s" % (width, "balrs " + usage, what) for usage, what in SUBCOMMANDS)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="balrs",
        description="balrs: an HTTP/1.1 load balancer in pure Python. Runs in the foreground and\n"
                    "logs to stderr; SIGTERM or SIGINT drains and exits 0.",
        epilog=_commands_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,  # keeps the command list's columns
    )
    p.add_argument("config", metavar="lb.ini", help="the configuration file")
    p.add_argument("--check", action="store_true",
                   help="validate the configuration and exit (0 if valid, 2 with a file:line error if not)")
    p.add_argument("--version", action="version", version="balrs %s" % __version__)
    p.add_argument("--listen", metavar="HOST:PORT[,HOST:PORT...]",
                   help="listen here instead of [balancer] listen")
    p.add_argument("--strategy", metavar="NAME", help="use this strategy instead of [balancer] strategy")
    p.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"],
                   help="log verbosity (default: info)")
    return p


def apply_overrides(config: Config, listen: Optional[str], strategy: Optional[str]) -> Config:
    """The configuration with command-line overrides applied. Raises ValueError with a message."""
    if listen is not None:
        addrs = []
        for item in listen.split(","):
            item = item.strip()
            if item:
                try:
                    addrs.append(parse_address(item))
                except ValueError as exc:
                    raise ValueError("--listen %s: %s" % (item, exc)) from None
        if not addrs:
            raise ValueError("--listen: no address given")
        # Not the file's addresses any more: an error about them names --listen, not a line.
        lines = tuple(k for k in config.key_lines if k[:2] != ("balancer", "listen"))
        config = dataclasses.replace(config, listen=tuple(addrs), key_lines=lines)
    if strategy is not None:
        canonical = STRATEGIES.get(strategy.lower())
        if canonical is None:
            raise ValueError("--strategy: unknown strategy %r (expected one of %s)"
                             % (strategy, ", ".join(sorted(STRATEGIES))))
        config = _override_default_strategy(config, canonical)
    return config


def _override_default_strategy(config: Config, strategy: str) -> Config:
    """``--strategy`` sets the default pool's strategy only (other pools keep theirs, and those that
    inherit [balancer]'s keep inheriting the file's)."""
    pools = list(config.pools)
    names = [p.name for p in pools]
    if DEFAULT_POOL in names:
        i = names.index(DEFAULT_POOL)
        pools[i] = dataclasses.replace(pools[i], strategy=strategy)
    elif any(b.pool == DEFAULT_POOL for b in config.backends):
        pools.append(PoolConfig(DEFAULT_POOL, strategy=strategy))
    others = [p for p in pools if p.name != DEFAULT_POOL]
    if not others and not any(b.pool != DEFAULT_POOL for b in config.backends):
        # Only the default pool: [balancer] strategy is its strategy (as /status reports it).
        return dataclasses.replace(config, strategy=strategy, pools=tuple(pools))
    return dataclasses.replace(config, pools=tuple(pools))


def _raise_fd_limit() -> None:
    """Every client and backend connection is a file descriptor: use the hard limit."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = 1 << 20
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "status":
        # `python -m balrs status [ADMIN_ADDR] [--watch]`: the live report (like the seed's -r flag).
        from .status import main as status_main
        return status_main(argv[1:])
    if argv and argv[0] == "demo":
        # `python -m balrs demo`: demo backends, the balancer and the dashboard on 127.0.0.1.
        from .demo import main as demo_main
        return demo_main(argv[1:])
    if argv and argv[0] == "zipapp":
        # `python -m balrs zipapp [-o balrs.pyz]`: a reproducible single-file build (pyz.py).
        from .pyz import main as zipapp_main
        return zipapp_main(argv[1:])
    if argv and argv[0] == "explain":
        # `python -m balrs explain lb.ini "GET /path" ...`: the routes, pool, backends and pick (explain.py).
        from .explain import main as explain_main
        return explain_main(argv[1:])
    if argv and argv[0] == "simulate":
        # `python -m balrs simulate lb.ini TRACE [--strategy A,B,...]`: strategies on a virtual clock.
        from .simulate import main as simulate_main
        return simulate_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        config = load(args.config)
        config = apply_overrides(config, args.listen, args.strategy)
        load_tls(config)  # certificates and CA files: a file that cannot be loaded is a config error
        check_strategies(config)  # Python strategies: a class that cannot be loaded is a config error
    except ConfigError as exc:
        sys.stderr.write("%s\n" % exc)
        return 2
    except ValueError as exc:
        sys.stderr.write("balrs: %s\n" % exc)
        return 2
    if args.check:
        sys.stdout.write("%s: configuration OK (%d backend(s), strategy %s)\n"
                         % (args.config, len(config.backends), config.strategy))
        return 0

    # The command line's --log-level wins over [log] level.
    level = args.log_level or config.log.level
    logging.basicConfig(level=getattr(logging, level.upper()), format=LOG_FORMAT, stream=sys.stderr)
    # Lines that can repeat per request (connect failures during an outage) are rate-limited, with a
    # count of those held back.
    for handler in logging.getLogger().handlers:
        handler.addFilter(RateLimitFilter())
    _raise_fd_limit()
    return run(config, lambda c: apply_overrides(c, args.listen, args.strategy))


def run(config: Config, overrides: Optional[Callable[[Config], Config]] = None) -> int:
    if config.workers > 1:
        from .supervisor import Supervisor
        try:
            return Supervisor(config, overrides).run()
        except OSError as exc:
            return _start_failed(config, exc)
    from .server import Balancer
    try:
        balancer = Balancer(config, overrides=overrides)
    except OSError as exc:  # the access log file cannot be opened
        log.error("%s", exc.strerror or exc)
        return 1
    # Handlers first: a SIGTERM that arrives as soon as the port is open must drain, not kill.
    balancer.install_signal_handlers()
    try:
        balancer.listen()
        balancer.start()  # the admin endpoint binds here
    except OSError as exc:
        return _start_failed(config, exc)
    log.info("balrs %s listening on %s; strategy %s; backends %s", __version__,
             ", ".join(balancer.bound_addresses()), config.strategy,
             ", ".join("%s=%s" % (b.name, b.address) for b in config.backends))
    try:
        return balancer.run()
    finally:
        balancer.reactor.close()


def _start_failed(config: Config, exc: OSError) -> int:
    """A start-up OSError. A listen address that cannot be bound is reported like an error in the file,
    with its line and key (``lb.ini:9: [admin] listen: cannot listen on 127.0.0.1:9100: Address already
    in use``), exit 2; anything else is logged, exit 1."""
    if not isinstance(exc, ListenError):
        log.error("%s", exc.strerror or exc)
        return 1
    admin = config.admin
    section = "admin" if admin is not None and exc.address in admin.listen else "balancer"
    message = exc.strerror or str(exc)
    if config.line_of(section, "listen"):
        sys.stderr.write("%s\n" % config.error(section, "listen", message))
    else:
        sys.stderr.write("balrs: --listen: %s\n" % message)
    return 2


def _main_entry(argv: Optional[List[str]] = None) -> None:
    sys.exit(main(argv))
