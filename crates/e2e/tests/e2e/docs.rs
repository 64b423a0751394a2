//! The README and the pages under docs/ link to each other and to files of
//! the repository: every relative link must point at a file that exists and,
//! with an `#anchor`, at a heading of that page.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

/// README.md and every docs/*.md, in a stable order.
fn markdown_files() -> Vec<PathBuf> {
    let root = Path::new(ROOT);
    let mut files = vec![root.join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("docs/ exists")
        .map(|entry| entry.expect("a docs/ entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

/// The lines of `text` outside fenced code blocks, with their line numbers.
fn prose_lines(text: &str) -> Vec<(usize, &str)> {
    let mut fence: Option<&str> = None;
    let mut lines = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        let marker = ["```", "~~~"]
            .into_iter()
            .find(|marker| trimmed.starts_with(marker));
        match (fence, marker) {
            (None, Some(marker)) => fence = Some(marker),
            (Some(open), Some(marker)) if open == marker => fence = None,
            (None, None) => lines.push((index + 1, line)),
            _ => {}
        }
    }
    lines
}

/// `line` without its inline code spans (a link's target is never in one,
/// but code may contain `](`).
fn without_code_spans(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut in_code = false;
    for c in line.chars() {
        if c == '`' {
            in_code = !in_code;
        } else if !in_code {
            out.push(c);
        }
    }
    out
}

/// The targets of the inline links and images on `line`: what stands
/// between `](` and the matching `)`, without a title.
fn link_targets(line: &str) -> Vec<String> {
    let line = without_code_spans(line);
    let mut targets = Vec::new();
    let mut rest = line.as_str();
    while let Some(start) = rest.find("](") {
        rest = &rest[start + 2..];
        let mut depth = 0usize;
        let mut end = rest.len();
        for (i, c) in rest.char_indices() {
            match c {
                '(' => depth += 1,
                ')' if depth == 0 => {
                    end = i;
                    break;
                }
                ')' => depth -= 1,
                _ => {}
            }
        }
        let inside = rest[..end].trim();
        let target = inside
            .strip_prefix('<')
            .and_then(|t| t.split_once('>'))
            .map(|(t, _)| t)
            .unwrap_or_else(|| inside.split_whitespace().next().unwrap_or(""));
        targets.push(target.to_owned());
        rest = &rest[end..];
    }
    targets
}

/// GitHub's anchor for a heading: lowercase, spaces to '-', every other
/// character that is not alphanumeric, '-' or '_' dropped.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// Every anchor the headings of `text` give, with GitHub's `-1`, `-2`, …
/// for repeated headings.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut anchors = BTreeSet::new();
    for (_, line) in prose_lines(text) {
        let hashes = line.chars().take_while(|&c| c == '#').count();
        if !(1..=6).contains(&hashes) || !line[hashes..].starts_with(' ') {
            continue;
        }
        let base = slug(line[hashes..].trim().trim_end_matches('#'));
        let count = seen.entry(base.clone()).or_default();
        anchors.insert(if *count == 0 {
            base.clone()
        } else {
            format!("{base}-{count}")
        });
        *count += 1;
    }
    anchors
}

/// `path` relative to the workspace root, with `.` and `..` worked out, for
/// the failure message.
fn shown(path: &Path) -> String {
    let relative = path.strip_prefix(ROOT).unwrap_or(path);
    let mut parts: Vec<&std::ffi::OsStr> = Vec::new();
    for component in relative.components() {
        match component {
            std::path::Component::ParentDir => {
                parts.pop();
            }
            std::path::Component::CurDir => {}
            other => parts.push(other.as_os_str()),
        }
    }
    parts.iter().collect::<PathBuf>().display().to_string()
}

fn is_external(target: &str) -> bool {
    let lower = target.to_ascii_lowercase();
    ["http://", "https://", "mailto:"]
        .iter()
        .any(|scheme| lower.starts_with(scheme))
}

/// What is wrong with `target`, linked from `file`, if anything.
fn check_link(file: &Path, text: &str, target: &str) -> Option<String> {
    if target.is_empty() {
        return Some("an empty link".to_owned());
    }
    let (path, anchor) = match target.split_once('#') {
        Some((path, anchor)) => (path, Some(anchor)),
        None => (target, None),
    };
    let (linked, linked_text) = if path.is_empty() {
        (file.to_path_buf(), Some(text.to_owned()))
    } else {
        let linked = file.parent().expect("a file has a directory").join(path);
        if !linked.exists() {
            return Some(format!("{} does not exist", shown(&linked)));
        }
        let is_markdown = linked.extension().is_some_and(|ext| ext == "md");
        let linked_text = if is_markdown {
            Some(std::fs::read_to_string(&linked).expect("a linked page reads"))
        } else {
            None
        };
        (linked, linked_text)
    };
    match (anchor, linked_text) {
        (Some(anchor), Some(linked_text)) if !anchors(&linked_text).contains(anchor) => {
            Some(format!("{} has no heading for #{anchor}", shown(&linked)))
        }
        _ => None,
    }
}

#[test]
fn every_relative_link_in_the_readme_and_docs_resolves() {
    let mut broken = Vec::new();
    let mut checked = 0;
    for file in markdown_files() {
        let text = std::fs::read_to_string(&file).expect("a markdown file reads");
        let name = shown(&file);
        for (line_number, line) in prose_lines(&text) {
            for target in link_targets(line) {
                if is_external(&target) {
                    continue;
                }
                checked += 1;
                if let Some(problem) = check_link(&file, &text, &target) {
                    broken.push(format!("{name}:{line_number}: ({target}): {problem}"));
                }
            }
        }
    }
    assert!(checked > 0, "no relative link found: is the parser broken?");
    assert!(
        broken.is_empty(),
        "{} broken link(s) in README.md and docs/*.md:\n{}",
        broken.len(),
        broken.join("\n")
    );
}

#[test]
fn headings_become_github_anchors_and_links_are_found_outside_code() {
    assert_eq!(slug("The chaos suite"), "the-chaos-suite");
    assert_eq!(
        slug("The broker keeps its state across `docker compose down`/`up`"),
        "the-broker-keeps-its-state-across-docker-compose-downup"
    );
    assert_eq!(
        slug("Queues, fanout and the stream"),
        "queues-fanout-and-the-stream"
    );
    assert_eq!(
        slug("API keys: who may do what"),
        "api-keys-who-may-do-what"
    );
    assert_eq!(
        anchors("# A\n\n```sh\n# not a heading\n```\n## A\n"),
        BTreeSet::from(["a".to_owned(), "a-1".to_owned()])
    );
    assert_eq!(
        link_targets("see [a](a.md#x), ![b](b.png \"t\") and `[c](c.md)`"),
        ["a.md#x", "b.png"]
    );
    assert_eq!(
        prose_lines("x\n```\n[a](a.md)\n```\ny").len(),
        2,
        "fenced code is not prose"
    );
}
