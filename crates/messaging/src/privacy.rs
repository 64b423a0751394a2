//! What personal data may appear in a log line: an email address keeps its
//! first character and its domain; a URL keeps its scheme, host and port
//! (never its user, password, path or query, where tokens live). Logs are
//! for finding out what happened to an order, and the order id does that.

/// `ada@example.com` → `a***@example.com`; no `@`: `***`.
pub fn email(address: &str) -> String {
    match address.rsplit_once('@') {
        Some((local, domain)) => {
            let first: String = local.chars().take(1).collect();
            format!("{first}***@{domain}")
        }
        None => "***".to_owned(),
    }
}

/// `https://user:pw@hooks.example.com:8443/t/abc?token=x` →
/// `https://hooks.example.com:8443`; not a URL: `(not a URL)`.
pub fn url(raw: &str) -> String {
    let Ok(parsed) = url::Url::parse(raw) else {
        return "(not a URL)".to_owned();
    };
    match (parsed.host_str(), parsed.port()) {
        (Some(host), Some(port)) => format!("{}://{host}:{port}", parsed.scheme()),
        (Some(host), None) => format!("{}://{host}", parsed.scheme()),
        (None, _) => format!("{}:", parsed.scheme()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_email_keeps_its_domain_only() {
        assert_eq!(email("ada@example.com"), "a***@example.com");
        assert_eq!(email("x@y"), "x***@y");
        assert_eq!(email("no-at-sign"), "***");
        assert!(!email("grace.hopper@navy.mil").contains("grace"));
    }

    #[test]
    fn a_url_keeps_its_origin_only() {
        assert_eq!(
            url("https://user:pw@hooks.example.com:8443/t/abc?token=s3cret#x"),
            "https://hooks.example.com:8443"
        );
        assert_eq!(url("http://[::1]:80/a?b=c"), "http://[::1]");
        assert_eq!(
            url("http://127.0.0.1:9000/hook?sig=1"),
            "http://127.0.0.1:9000"
        );
        assert_eq!(url("not a url"), "(not a URL)");
    }
}
