"""``--device`` of inference, benchmark and serve: a device this machine does not have is one line naming it and
what is available, before the model loads (not a traceback after)."""

import pytest
import torch


def _missing_gpu() -> str:
    """A CUDA device that is not here: ``cuda`` on a machine without one, else one index past the last."""
    return f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"


def test_check_device_accepts_what_is_here_and_names_what_is_not():
    from llama_expert.errors import ConfigError
    from llama_expert.integration.devices import available_devices, check_device

    for device in available_devices() + ["cpu", None]:
        check_device(device)
    for device, words in (("tpu", "is not a device torch knows"), ("cuda:x", "is not a device torch knows"),
                          (_missing_gpu(), "cuda")):
        with pytest.raises(ConfigError) as info:
            check_device(device)
        message = str(info.value)
        assert message.startswith(f"--device {device}") and words in message
        assert message.endswith(f"available here: {', '.join(available_devices())}.")


@pytest.mark.parametrize("command", [["inference", "--prompt", "hi"], ["benchmark", "--skip-throughput"],
                                     ["serve", "--port", "8765"]])
@pytest.mark.parametrize("device", ["tpu", "missing-gpu"])
def test_a_device_that_is_not_here_is_one_line_before_loading(command, device, chat_folder, tmp_path, cli_error):
    device = _missing_gpu() if device == "missing-gpu" else device
    err = cli_error([command[0], "--model", str(chat_folder), "--device", device, *command[1:]])
    assert err.startswith(f"error: --device {device}") and "available here: cpu" in err
    # before loading: with a model that does not exist, the device is still what is reported
    err = cli_error([command[0], "--model", str(tmp_path / "no-model"), "--device", device, *command[1:]])
    assert err.startswith(f"error: --device {device}")
