"""The machine line saved with every benchmark table names the CPU model."""

import platform

import torch

from bench.timing import cpu_model, machine_description


def test_cpu_model_reads_the_model_name_line(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nvendor_id\t: AuthenticAMD\n"
        "model name\t: AMD EPYC  9454P 48-Core Processor\nflags\t\t: fpu avx2\n\n"
        "processor\t: 1\nmodel name\t: AMD EPYC  9454P 48-Core Processor\n"
    )
    assert cpu_model(str(cpuinfo)) == f"AMD EPYC 9454P 48-Core Processor, {platform.machine()}"


def test_cpu_model_without_a_model_line_or_file_falls_back_to_platform(tmp_path):
    fallback = platform.processor() or platform.machine()
    no_model = tmp_path / "cpuinfo"
    no_model.write_text("processor\t: 0\nmodel name\t: \nBogoMIPS\t: 50.00\n")
    assert cpu_model(str(no_model)) == fallback
    assert cpu_model(str(tmp_path / "missing")) == fallback


def test_machine_description_names_cores_cpu_and_torch():
    line = machine_description(torch.device("cpu"))
    assert line.endswith(f"), PyTorch {torch.__version__}")
    assert " CPU cores (" in line and cpu_model() in line
