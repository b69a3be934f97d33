"""Apache Beam jobs: sample building, clustering, user-cache precompute."""
import tfmodels  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)


def beam_main(prog, doc, add_arguments, run, error_cls, argv=None) -> int:
    """The ``python -m beam_jobs.<job>`` entry point shared by the Beam jobs: parse the
    job's flags (unknown ones are Beam pipeline options), run it, and turn the job's
    own error class into one ``<prog>: error: ...`` line and exit code 2."""
    import argparse
    import sys
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0])
    add_arguments(parser)
    args, beam_args = parser.parse_known_args(argv)
    try:
        run(args, beam_args)
    except error_cls as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return 0
