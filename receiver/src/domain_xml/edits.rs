//! Edits over byte ranges of one XML text, applied together: how [`super::rewrite`] changes
//! a captured definition while leaving every byte it does not touch exactly as captured.

use super::DomainXmlError;
use std::ops::Range;

/// Edits over byte ranges of one text, applied together.
pub(super) struct Edits<'t> {
    text: &'t str,
    list: Vec<(Range<usize>, String)>,
}

impl<'t> Edits<'t> {
    pub(super) fn new(text: &'t str) -> Edits<'t> {
        Edits {
            text,
            list: Vec::new(),
        }
    }

    pub(super) fn replace(&mut self, range: Range<usize>, with: String) {
        self.list.push((range, with));
    }

    pub(super) fn insert(&mut self, at: usize, piece: String) {
        self.list.push((at..at, piece));
    }

    /// Removes an element; when it is alone on its line, the whole line goes.
    pub(super) fn remove_line(&mut self, node: roxmltree::Node) {
        let bytes = self.text.as_bytes();
        let Range { mut start, mut end } = node.range();
        let indent = bytes[..start]
            .iter()
            .rev()
            .take_while(|b| matches!(b, b' ' | b'\t'))
            .count();
        let trail = bytes[end..]
            .iter()
            .take_while(|b| matches!(b, b' ' | b'\t'))
            .count();
        let line_start = start - indent;
        let at_line_start = line_start == 0 || bytes[line_start - 1] == b'\n';
        if at_line_start && bytes.get(end + trail) == Some(&b'\n') {
            start = line_start;
            end += trail + 1;
        }
        self.list.push((start..end, String::new()));
    }

    /// The blanks before an element that starts its line.
    pub(super) fn indent_of(&self, node: roxmltree::Node) -> Option<&'t str> {
        let start = node.range().start;
        let before = &self.text[..start];
        let line_start = before.rfind('\n')? + 1;
        let indent = &before[line_start..];
        indent
            .bytes()
            .all(|b| b == b' ' || b == b'\t')
            .then_some(indent)
    }

    /// Removes an attribute with the blank before it.
    pub(super) fn remove_attribute(&mut self, attribute: roxmltree::Attribute) {
        let Range { start, end } = attribute.range();
        let blank = self.text.as_bytes()[..start]
            .iter()
            .rev()
            .take_while(|b| b.is_ascii_whitespace())
            .count();
        self.list.push((start - blank..end, String::new()));
    }

    /// Sets an attribute of an element (`value` must need no escaping), replacing it in place
    /// or adding it right after the tag name.
    pub(super) fn set_attribute(&mut self, node: roxmltree::Node, name: &str, value: &str) {
        let piece = format!("{name}='{value}'");
        match node.attribute_node(name) {
            Some(old) => self.replace(old.range(), piece),
            None => {
                let start = node.range().start;
                let tag = self.text.as_bytes()[start + 1..]
                    .iter()
                    .take_while(|b| !(b.is_ascii_whitespace() || **b == b'/' || **b == b'>'))
                    .count();
                self.insert(start + 1 + tag, format!(" {piece}"));
            }
        }
    }

    pub(super) fn apply(mut self) -> Result<String, DomainXmlError> {
        self.list.sort_by_key(|(r, _)| (r.start, r.end));
        let mut out = String::with_capacity(self.text.len());
        let mut at = 0;
        for (range, piece) in &self.list {
            if range.start < at {
                return Err(DomainXmlError::Overlap(range.start));
            }
            out.push_str(&self.text[at..range.start]);
            out.push_str(piece);
            at = range.end;
        }
        out.push_str(&self.text[at..]);
        Ok(out)
    }
}
