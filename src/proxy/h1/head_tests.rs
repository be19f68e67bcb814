//! Tables and properties for `head.rs`: request classification and rewriting, response
//! framing and rewriting.

mod table {
    use super::super::*;

    fn parse_req(raw: &str, f: impl FnOnce(&httparse::Request<'_, '_>)) {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        assert!(req.parse(raw.as_bytes()).unwrap().is_complete(), "{raw}");
        f(&req);
    }

    #[test]
    fn takes_plain_requests_and_hands_over_the_rest() {
        type Case = (&'static str, Result<(usize, bool), Handover>);
        let cases: &[Case] = &[
            ("GET / HTTP/1.1\r\nHost: a\r\n\r\n", Ok((0, false))),
            (
                "POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\n\r\n",
                Ok((12, false)),
            ),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nConnection: Keep-Alive, close\r\n\r\n",
                Ok((0, true)),
            ),
            ("GET / HTTP/1.0\r\nHost: a\r\n\r\n", Err(Handover::Version)),
            (
                "GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
                Err(Handover::RequestTarget),
            ),
            (
                "OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
                Err(Handover::RequestTarget),
            ),
            ("GET / HTTP/1.1\r\n\r\n", Err(Handover::Host)),
            (
                "GET /.well-known/acme-challenge/tok HTTP/1.1\r\nHost: a\r\n\r\n",
                Err(Handover::AcmeChallenge),
            ),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
                Err(Handover::Host),
            ),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\nConnection: x\r\n\r\n",
                Err(Handover::Connection),
            ),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
                Err(Handover::Upgrade),
            ),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\n\r\n",
                Err(Handover::Upgrade),
            ),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\n\r\n",
                Err(Handover::Upgrade),
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
                Err(Handover::Expect),
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
                Err(Handover::TransferEncoding),
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
                Err(Handover::TransferEncoding),
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
                Err(Handover::ContentLength),
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\n",
                Err(Handover::ContentLength),
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 1\r\n\r\n",
                Err(Handover::ContentLength),
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\n",
                Err(Handover::ContentLength),
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 65537\r\n\r\n",
                Err(Handover::LargeBody),
            ),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nTunnox-Hops: 2\r\n\r\n",
                Ok((0, false)),
            ),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nTunnox-Hops: two\r\n\r\n",
                Err(Handover::Hops),
            ),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nTunnox-Node: x\r\n\r\n",
                Err(Handover::TunnelHeader),
            ),
            (
                "GET / HTTP/1.1\r\nHost: a\r\ntunnox-target: 10.0.0.1:22\r\n\r\n",
                Err(Handover::TunnelHeader),
            ),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nTUNNOX-CONTROL: 1\r\n\r\n",
                Err(Handover::TunnelHeader),
            ),
        ];
        for (raw, want) in cases {
            parse_req(raw, |req| {
                let got = classify_request(req).map(|h| (h.content_length, h.close));
                assert_eq!(&got, want, "{raw:?}");
            });
        }
    }

    #[test]
    fn every_internal_header_goes_to_the_general_path() {
        for name in crate::proxy::tunnel::INTERNAL_HEADERS {
            let raw = format!(
                "GET / HTTP/1.1\r\nHost: a\r\n{}: 1\r\n\r\n",
                name.as_str().to_uppercase()
            );
            parse_req(&raw, |req| {
                assert_eq!(
                    classify_request(req).err(),
                    Some(Handover::TunnelHeader),
                    "{name}"
                );
            });
        }
    }

    fn rewrite(raw: &str, extra: &[(&str, &str)]) -> String {
        rewrite_from("http", raw, extra)
    }

    /// `raw` rewritten as received on a listener speaking `proto`.
    fn rewrite_from(proto: &str, raw: &str, extra: &[(&str, &str)]) -> String {
        let extra = crate::proxy::header_pairs(extra);
        let mut out = Vec::new();
        parse_req(raw, |req| {
            let head = classify_request(req).unwrap();
            write_request_head(&mut out, req, &head, "10.1.2.3", proto, 1, &extra);
        });
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_request_over_tls_is_forwarded_as_https() {
        // A client's own `X-Forwarded-Proto` never survives: the listener says what it was.
        let raw = "GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-Proto: http\r\n\r\n";
        assert_eq!(
            rewrite_from("https", raw, &[]),
            "GET / HTTP/1.1\r\nhost: a\r\nx-forwarded-for: 10.1.2.3\r\n\
             x-forwarded-proto: https\r\nx-forwarded-host: a\r\ntunnox-hops: 1\r\n\r\n"
        );
    }

    #[test]
    fn rewrites_request_heads_like_the_general_path() {
        let got = rewrite(
            "POST /p?q=1 HTTP/1.1\r\nHost: App.Example.com:8080\r\nConnection: keep-alive, x-secret\r\n\
             Keep-Alive: timeout=5\r\nX-Secret: 1\r\nTE: gzip, trailers\r\nProxy-Authorization: Basic x\r\n\
             X-Forwarded-For: 192.0.2.1\r\nX-Forwarded-For: 192.0.2.2\r\nX-Forwarded-Proto: https\r\n\
             X-Forwarded-Host: evil\r\nX-Env: client\r\nAccept: */*\r\nContent-Length: 2\r\n\r\n",
            &[("x-env", "dev")],
        );
        assert_eq!(
            got,
            "POST /p?q=1 HTTP/1.1\r\nhost: App.Example.com:8080\r\nAccept: */*\r\ncontent-length: 2\r\n\
             te: trailers\r\nx-forwarded-for: 192.0.2.1, 192.0.2.2, 10.1.2.3\r\nx-forwarded-proto: http\r\n\
             x-forwarded-host: App.Example.com:8080\r\ntunnox-hops: 1\r\nx-env: dev\r\n\r\n"
        );
    }

    #[test]
    fn framing_headers_cannot_be_dropped_and_mapping_headers_replace() {
        // `Connection` naming the length must not leave the body to be read as a second request.
        let got = rewrite(
            "POST / HTTP/1.1\r\nHost: a\r\nConnection: content-length, x-forwarded-for\r\n\
             X-Forwarded-For: 192.0.2.1\r\nContent-Length: 3\r\n\r\n",
            &[],
        );
        assert_eq!(
            got,
            "POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\nx-forwarded-for: 10.1.2.3\r\n\
             x-forwarded-proto: http\r\nx-forwarded-host: a\r\ntunnox-hops: 1\r\n\r\n"
        );
        let got = rewrite(
            "GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: caf\u{e9}\r\n\r\n",
            &[("host", "internal.svc"), ("x-forwarded-proto", "https")],
        );
        assert_eq!(
            got,
            "GET / HTTP/1.1\r\nx-forwarded-for: 10.1.2.3\r\nx-forwarded-host: a\r\n\
             tunnox-hops: 1\r\nhost: internal.svc\r\nx-forwarded-proto: https\r\n\r\n"
        );
    }

    fn parse_resp(raw: &str, head_req: bool) -> Result<(Framing, bool, String), &'static str> {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        assert!(resp.parse(raw.as_bytes()).unwrap().is_complete(), "{raw}");
        let head = classify_response(&resp, head_req)?;
        let mut out = Vec::new();
        let date = b"Mon, 23 Nov 2026 00:00:00 GMT";
        write_response_head(
            &mut out,
            &resp,
            &head,
            head.framing == Framing::UntilClose,
            date,
        );
        Ok((
            head.framing,
            head.upstream_closes,
            String::from_utf8(out).unwrap(),
        ))
    }

    #[test]
    fn frames_responses() {
        use Framing::*;
        type Case = (&'static str, bool, Result<(Framing, bool), &'static str>);
        let cases: &[Case] = &[
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
                false,
                Ok((Length(5), false)),
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
                false,
                Ok((Length(5), false)),
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
                false,
                Err("conflicting Content-Length headers"),
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
                false,
                Err("malformed Content-Length"),
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
                false,
                Ok((Chunked, false)),
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                false,
                Err("unsupported Transfer-Encoding"),
            ),
            ("HTTP/1.1 200 OK\r\n\r\n", false, Ok((UntilClose, true))),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
                true,
                Ok((None, false)),
            ),
            ("HTTP/1.1 204 No Content\r\n\r\n", false, Ok((None, false))),
            (
                "HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
                false,
                Ok((None, false)),
            ),
            (
                "HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n",
                false,
                Ok((None, false)),
            ),
            (
                "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
                false,
                Ok((Length(0), true)),
            ),
            (
                "HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
                false,
                Ok((Length(0), true)),
            ),
            (
                "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
                false,
                Ok((Length(0), false)),
            ),
        ];
        for (raw, head_req, want) in cases {
            let got = parse_resp(raw, *head_req).map(|(f, c, _)| (f, c));
            assert_eq!(&got, want, "{raw:?}");
        }
    }

    #[test]
    fn rewrites_response_heads() {
        let (_, _, head) = parse_resp(
            "HTTP/1.1 200 \r\nConnection: keep-alive, x-internal\r\nX-Internal: 1\r\nKeep-Alive: timeout=5\r\n\
             Transfer-Encoding: chunked\r\nContent-Length: 3\r\nTrailer: x\r\nServer: up\r\n\r\n",
            false,
        )
        .unwrap();
        let date = "date: Mon, 23 Nov 2026 00:00:00 GMT\r\n";
        assert_eq!(
            head,
            format!("HTTP/1.1 200 OK\r\nServer: up\r\ntransfer-encoding: chunked\r\n{date}\r\n")
        );
        let (_, _, head) = parse_resp("HTTP/1.1 404 Gone Fishing\r\n\r\n", false).unwrap();
        assert_eq!(
            head,
            format!("HTTP/1.1 404 Gone Fishing\r\n{date}connection: close\r\n\r\n")
        );
        // The length is the proxy's to state: `Connection` naming it does not remove it. A
        // bodiless response keeps the upstream's (it describes the resource); the date stays.
        let (_, _, head) = parse_resp(
            "HTTP/1.1 200 OK\r\nConnection: content-length\r\nDate: x\r\nContent-Length: 5\r\n\r\n",
            false,
        )
        .unwrap();
        assert_eq!(
            head,
            "HTTP/1.1 200 OK\r\nDate: x\r\ncontent-length: 5\r\n\r\n"
        );
        let (_, _, head) = parse_resp(
            "HTTP/1.1 200 OK\r\nDate: x\r\nContent-Length: 5\r\n\r\n",
            true,
        )
        .unwrap();
        assert_eq!(
            head,
            "HTTP/1.1 200 OK\r\nDate: x\r\nContent-Length: 5\r\n\r\n"
        );
    }
}

mod fuzz {
    use super::super::*;
    use proptest::prelude::*;

    fn header_line() -> impl Strategy<Value = String> {
        let names = prop_oneof![
            Just("Host".to_string()),
            Just("Connection".to_string()),
            Just("Content-Length".to_string()),
            Just("Transfer-Encoding".to_string()),
            Just("TE".to_string()),
            Just("X-Forwarded-For".to_string()),
            Just("Upgrade".to_string()),
            "[A-Za-z-]{1,12}",
        ];
        (names, "[ -~]{0,20}").prop_map(|(n, v)| format!("{n}: {v}\r\n"))
    }

    proptest! {
        /// Whatever head a client sends, classifying and rewriting it never panics, and a head
        /// the fast path takes is rewritten into one that parses, with one Host.
        #[test]
        fn any_head_is_classified_and_rewritten_safely(
            method in "(GET|POST|HEAD|PUT|[A-Z]{1,7})",
            path in "/[ -~&&[^ ]]{0,30}",
            lines in proptest::collection::vec(header_line(), 0..12),
        ) {
            let raw = format!("{method} {path} HTTP/1.1\r\n{}\r\n", lines.concat());
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut headers);
            if let Ok(httparse::Status::Complete(_)) = req.parse(raw.as_bytes())
                && let Ok(head) = classify_request(&req)
            {
                let mut out = Vec::new();
                write_request_head(&mut out, &req, &head, "127.0.0.1", "http", 1, &[]);
                let mut again = [httparse::EMPTY_HEADER; 64];
                let mut parsed = httparse::Request::new(&mut again);
                prop_assert!(parsed.parse(&out).unwrap().is_complete());
                let hosts = parsed.headers.iter().filter(|h| h.name.eq_ignore_ascii_case("host")).count();
                prop_assert_eq!(hosts, 1);
                prop_assert!(!parsed.headers.iter().any(|h| h.name.eq_ignore_ascii_case("transfer-encoding")));
            }
        }
    }
}
