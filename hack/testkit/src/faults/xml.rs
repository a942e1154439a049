//! Just enough XML for EC2 query-protocol responses: a small element tree with byte
//! ranges (so responses can be patched in place) and the EC2 error document.

use std::ops::Range;

/// An element of a parsed document. Names are local names (no namespace prefix).
#[derive(Debug, Clone, Default)]
pub struct Element {
    /// Local name.
    pub name: String,
    /// Byte range of the whole element, from `<` of the start tag to `>` of the end tag.
    pub outer: Range<usize>,
    /// Byte range between the start and the end tag.
    pub inner: Range<usize>,
    /// The element's own text (unescaped, concatenated).
    pub text: String,
    /// Child elements in document order.
    pub children: Vec<Element>,
}

impl Element {
    /// The first direct child named `name`.
    pub fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }

    /// The trimmed text of the first direct child named `name`.
    pub fn child_text(&self, name: &str) -> Option<&str> {
        self.child(name).map(|c| c.text.trim())
    }

    /// Every descendant (not `self`) named `name`, in document order.
    pub fn descendants<'a>(&'a self, name: &str, out: &mut Vec<&'a Element>) {
        for c in &self.children {
            if c.name == name {
                out.push(c);
            }
            c.descendants(name, out);
        }
    }

    /// Shorthand for [`Element::descendants`].
    pub fn find_all(&self, name: &str) -> Vec<&Element> {
        let mut out = Vec::new();
        self.descendants(name, &mut out);
        out
    }

    /// The trimmed text of the first descendant named `name`.
    pub fn find_text(&self, name: &str) -> Option<&str> {
        self.find_all(name).first().map(|e| e.text.trim())
    }
}

/// A malformed document.
#[derive(Debug, thiserror::Error)]
#[error("malformed XML: {0}")]
pub struct XmlError(String);

#[cfg(test)]
impl XmlError {
    pub(crate) fn from_test(s: &str) -> Self {
        Self(s.to_string())
    }
}

/// Parses `doc` into a synthetic root element (name `""`) holding the top-level elements.
pub fn parse(doc: &str) -> Result<Element, XmlError> {
    use xmlparser::{ElementEnd, Token};
    let mut stack = vec![Element {
        outer: 0..doc.len(),
        inner: 0..doc.len(),
        ..Element::default()
    }];
    for token in xmlparser::Tokenizer::from(doc) {
        let token = token.map_err(|e| XmlError(e.to_string()))?;
        match token {
            Token::ElementStart { local, span, .. } => stack.push(Element {
                name: local.as_str().to_string(),
                outer: span.start()..span.end(),
                ..Element::default()
            }),
            Token::ElementEnd { end, span } => match end {
                ElementEnd::Open => {
                    let top = stack
                        .last_mut()
                        .ok_or_else(|| XmlError("unbalanced".into()))?;
                    top.inner = span.end()..span.end();
                }
                ElementEnd::Empty | ElementEnd::Close(..) => {
                    let mut el = stack.pop().ok_or_else(|| XmlError("unbalanced".into()))?;
                    if matches!(end, ElementEnd::Empty) {
                        el.inner = span.end()..span.end();
                    } else {
                        el.inner.end = span.start();
                    }
                    el.outer.end = span.end();
                    stack
                        .last_mut()
                        .ok_or_else(|| XmlError("unbalanced".into()))?
                        .children
                        .push(el);
                }
            },
            Token::Text { text } => {
                if let Some(top) = stack.last_mut() {
                    top.text.push_str(&unescape(text.as_str()));
                }
            }
            Token::Cdata { text, .. } => {
                if let Some(top) = stack.last_mut() {
                    top.text.push_str(text.as_str());
                }
            }
            _ => {}
        }
    }
    if stack.len() != 1 {
        return Err(XmlError("unclosed element".into()));
    }
    stack.pop().ok_or_else(|| XmlError("empty".into()))
}

/// Byte-range replacements applied to a document in one go.
#[derive(Debug, Default)]
pub struct Edits(Vec<(Range<usize>, String)>);

impl Edits {
    /// Replaces `range` with `with`.
    pub fn replace(&mut self, range: Range<usize>, with: impl Into<String>) {
        self.0.push((range, with.into()));
    }

    /// Inserts `text` at byte `at`.
    pub fn insert(&mut self, at: usize, text: impl Into<String>) {
        self.0.push((at..at, text.into()));
    }

    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Applies the edits (ranges must not overlap).
    pub fn apply(mut self, doc: &str) -> String {
        self.0
            .sort_by_key(|(r, _)| std::cmp::Reverse((r.start, r.end)));
        let mut out = doc.to_string();
        for (range, with) in self.0 {
            if range.start <= range.end && range.end <= out.len() {
                out.replace_range(range, &with);
            }
        }
        out
    }
}

/// Escapes text for element content.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

fn unescape(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

/// The EC2 query-protocol error document.
pub fn error_document(code: &str, message: &str, request_id: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{}</Code><Message>{}</Message></Error></Errors><RequestID>{}</RequestID></Response>",
        escape(code),
        escape(message),
        escape(request_id)
    )
}

/// The error code of an EC2 error document, if `doc` is one.
pub fn error_code(doc: &str) -> Option<String> {
    let root = parse(doc).ok()?;
    root.find_text("Code").map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DESCRIBE: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<DescribeNetworkInterfacesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15"><networkInterfaceSet><item><attachment><attachTime>2026-11-28T08:41:40.000Z</attachTime><attachmentId>eni-attach-1</attachmentId><deleteOnTermination>false</deleteOnTermination><deviceIndex>1</deviceIndex><networkCardIndex>0</networkCardIndex><instanceId>i-1</instanceId><status>attached</status></attachment><description>a &amp; b</description><groupSet/><networkInterfaceId>eni-1</networkInterfaceId><status>in-use</status></item></networkInterfaceSet><requestId>request-id</requestId></DescribeNetworkInterfacesResponse>"#;

    #[test]
    fn parses_attachments() -> Result<(), XmlError> {
        let root = parse(DESCRIBE)?;
        let atts = root.find_all("attachment");
        assert_eq!(atts.len(), 1);
        assert_eq!(atts[0].child_text("attachmentId"), Some("eni-attach-1"));
        assert_eq!(atts[0].child_text("deviceIndex"), Some("1"));
        assert_eq!(atts[0].child_text("instanceId"), Some("i-1"));
        let items = root.find_all("item");
        assert_eq!(items[0].child_text("description"), Some("a & b"));
        assert_eq!(items[0].child_text("status"), Some("in-use"));
        let group_set = items[0].child("groupSet").map(|g| g.inner.clone());
        assert_eq!(group_set.map(|r| r.is_empty()), Some(true));
        Ok(())
    }

    #[test]
    fn edits_patch_in_place() -> Result<(), XmlError> {
        let root = parse(DESCRIBE)?;
        let att = root.find_all("attachment")[0];
        let mut edits = Edits::default();
        let dot = att.child("deleteOnTermination").map(|e| e.inner.clone());
        edits.replace(dot.unwrap_or(0..0), "true");
        let status = att.child("status").map(|e| e.inner.clone());
        edits.replace(status.unwrap_or(0..0), "attaching");
        edits.insert(att.inner.end, "<x>y</x>");
        let out = edits.apply(DESCRIBE);
        let root = parse(&out)?;
        let att = root.find_all("attachment")[0];
        assert_eq!(att.child_text("deleteOnTermination"), Some("true"));
        assert_eq!(att.child_text("status"), Some("attaching"));
        assert_eq!(att.child_text("x"), Some("y"));
        assert_eq!(
            root.find_all("item")[0].child_text("status"),
            Some("in-use")
        );
        Ok(())
    }

    #[test]
    fn error_document_round_trip() {
        let doc = error_document("InvalidParameterValue", "Instance 'i-1' <x>", "r-1");
        assert!(doc.contains("<Code>InvalidParameterValue</Code>"));
        assert!(doc.contains("&lt;x&gt;"));
        assert_eq!(error_code(&doc).as_deref(), Some("InvalidParameterValue"));
        let root = parse(&doc).unwrap_or_default();
        assert_eq!(root.find_text("Message"), Some("Instance 'i-1' <x>"));
    }

    #[test]
    fn malformed_is_an_error() {
        assert!(parse("<a><b></a>").is_err());
        assert!(parse("<a>").is_err());
    }
}
