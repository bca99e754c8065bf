"""`llama-expert train`: bad input is one line on stderr, without a traceback."""


def test_cli_train_reports_bad_input_without_traceback(tmp_path, capsys):
    from llama_expert.cli import main

    assert main(["train", "--dataset", str(tmp_path / "missing.txt"), "--output-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "dataset path not found" in err and "Traceback" not in err
    assert main(["train", "--top-k", "9", "--num-experts", "8", "--output-dir", str(tmp_path)]) == 1
    assert "--top-k 9 > --num-experts 8" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert main(["train", "--dataset", str(empty), "--output-dir", str(tmp_path)]) == 1
    assert "empty" in capsys.readouterr().err
