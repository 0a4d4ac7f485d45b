"""stm-env: print what stm-dist finds on this machine (torch, CUDA, DALI, DeepSpeed, kernels)."""
import argparse


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="stm-env",
        description="Report the versions and capabilities stm-dist sees: torch and CUDA, visible GPUs, "
        "whether stm_dist._C has CPU/CUDA kernels, DeepSpeed and its prebuilt ops, NVIDIA apex, DALI.",
    )
    parser.parse_args(argv)
    from stm_dist.env import collect, format_report

    print(format_report(collect()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
