//! The content service's Read responses, framed for the wire without copying their bytes.
//!
//! tonic encodes every response message into its own buffer: each byte a client reads would
//! be copied out of the stored chunk into a per-stream buffer that grows to the message size
//! and stays that large for the stream's life (measured with heaptrack under 64 concurrent
//! streams: 36 MiB of such buffers at the heap peak, and one memory pass over every byte
//! served). Here a Read response's few bytes of gRPC and protobuf framing are written on
//! their own and the stored chunk follows as its own body frame, the same buffer RocksDB
//! read it into (so a chunk stays pinned until the transport has sent it, where the copy
//! let it go at once: the peak is about the same, the copy and its CPU are gone).
//!
//! Only the framing lives here. The request still goes through `Content::read` (scope,
//! digest, errors, metrics), and every other method, and any Read this path does not handle
//! (a compressed request), goes to tonic's generated server unchanged.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use futures::{Stream, StreamExt};
use http_body::Frame;
use http_body_util::{BodyExt, Limited};
use prost::Message;
use tonic::metadata::MetadataMap;
use tonic::server::NamedService;
use tonic::{Code, Status};

use super::content::ContentService;
use super::pb::containerd::services::content::v1 as pb;
use pb::content_server::{Content, ContentServer};

const READ_PATH: &str = "/containerd.services.content.v1.Content/Read";

/// Largest Read request accepted (a digest, an offset, a size: well under 1 KiB).
const REQUEST_MAX: usize = 16 << 10;

/// Data up to this size is copied in beside its framing, one body frame instead of two.
const INLINE_MAX: usize = 16 << 10;

/// The gRPC message prefix: a compression flag and a big-endian length.
const PREFIX: usize = 5;

/// The content service: Read framed here, everything else by tonic.
#[derive(Clone)]
pub struct ContentRoutes {
    svc: std::sync::Arc<ContentService>,
    generated: ContentServer<ContentService>,
}

impl ContentRoutes {
    /// `limit` bounds messages in both directions on the generated server, as before.
    pub fn new(svc: ContentService, limit: usize) -> ContentRoutes {
        let svc = std::sync::Arc::new(svc);
        ContentRoutes {
            generated: ContentServer::from_arc(svc.clone())
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit),
            svc,
        }
    }
}

impl NamedService for ContentRoutes {
    const NAME: &'static str = <ContentServer<ContentService> as NamedService>::NAME;
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<B> tower::Service<http::Request<B>> for ContentRoutes
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        tower::Service::<http::Request<B>>::poll_ready(&mut self.generated, cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() == READ_PATH && uncompressed(req.headers()) {
            let svc = self.svc.clone();
            Box::pin(async move { Ok(read(&svc, req).await) })
        } else {
            Box::pin(self.generated.call(req))
        }
    }
}

/// Whether the request message is sent as is (tonic answers a compressed one: the service
/// does not accept compression, and says so in tonic's words).
fn uncompressed(headers: &http::HeaderMap) -> bool {
    headers
        .get("grpc-encoding")
        .is_none_or(|v| v.as_bytes() == b"identity")
}

async fn read<B>(svc: &ContentService, req: http::Request<B>) -> http::Response<tonic::body::Body>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError> + Send + 'static,
{
    let (parts, body) = req.into_parts();
    let msg = match request_message(body).await {
        Ok(m) => m,
        Err(s) => return s.into_http(),
    };
    let req = tonic::Request::from_parts(
        MetadataMap::from_headers(parts.headers),
        parts.extensions,
        msg,
    );
    match svc.read(req).await {
        Err(s) => s.into_http(),
        Ok(resp) => {
            let (meta, stream, _) = resp.into_parts();
            let mut out = http::Response::new(tonic::body::Body::new(ReadBody {
                stream,
                data: None,
                done: false,
            }));
            *out.headers_mut() = meta.into_headers();
            out.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/grpc"),
            );
            out
        }
    }
}

/// The one request message of a unary-request call, its size bounded before it is buffered.
async fn request_message<B>(body: B) -> Result<pb::ReadContentRequest, Status>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError> + Send + 'static,
{
    let bytes = Limited::new(body, PREFIX + REQUEST_MAX)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                Status::resource_exhausted(format!("Read request larger than {REQUEST_MAX} bytes"))
            } else {
                Status::cancelled(format!("reading the Read request: {e}"))
            }
        })?
        .to_bytes();
    let Some(head) = bytes.get(..PREFIX) else {
        return Err(Status::internal("missing request message"));
    };
    if head[0] != 0 {
        return Err(Status::internal(
            "compressed request message without a grpc-encoding header",
        ));
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if bytes.len() - PREFIX != len {
        return Err(Status::internal(format!(
            "request message of {len} bytes, {} sent: a unary request carries exactly one",
            bytes.len() - PREFIX
        )));
    }
    pb::ReadContentRequest::decode(bytes.slice(PREFIX..))
        .map_err(|e| Status::internal(format!("decoding the Read request: {e}")))
}

/// A Read's response messages as body frames: each message's framing, then its data as a
/// frame of its own (small data rides with its framing), then the status as trailers.
struct ReadBody {
    stream: Pin<Box<dyn Stream<Item = Result<pb::ReadContentResponse, Status>> + Send>>,
    /// The data that follows the framing just sent.
    data: Option<Bytes>,
    done: bool,
}

impl http_body::Body for ReadBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if let Some(d) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        if self.done {
            return Poll::Ready(None);
        }
        let end = match futures::ready!(self.stream.poll_next_unpin(cx)) {
            Some(Ok(m)) => {
                let (head, data) = frame(m)?;
                self.data = data;
                return Poll::Ready(Some(Ok(Frame::data(head))));
            }
            Some(Err(s)) => s,
            None => Status::new(Code::Ok, ""),
        };
        self.done = true;
        let mut trailers = http::HeaderMap::new();
        end.add_header(&mut trailers)?;
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.data.is_none()
    }
}

/// One response message's framing (with its data when that is small), and the data to send
/// after it. Fields are encoded by prost, `data` last and by hand: protobuf readers accept
/// fields in any order, so `data` can follow as its own buffer.
fn frame(m: pb::ReadContentResponse) -> Result<(Bytes, Option<Bytes>), Status> {
    let data = m.data;
    let rest = pb::ReadContentResponse {
        data: Bytes::new(),
        ..m
    };
    let mut head = BytesMut::with_capacity(PREFIX + 24 + data.len().min(INLINE_MAX));
    head.put_bytes(0, PREFIX);
    rest.encode(&mut head)
        .map_err(|e| Status::internal(format!("encoding a Read response: {e}")))?;
    if !data.is_empty() {
        prost::encoding::encode_key(2, prost::encoding::WireType::LengthDelimited, &mut head);
        prost::encoding::encode_varint(data.len() as u64, &mut head);
    }
    let len = u32::try_from(head.len() - PREFIX + data.len())
        .map_err(|_| Status::internal("a Read response message over 4 GiB"))?;
    head[1..PREFIX].copy_from_slice(&len.to_be_bytes());
    if data.len() <= INLINE_MAX {
        head.extend_from_slice(&data);
        return Ok((head.freeze(), None));
    }
    Ok((head.freeze(), Some(data)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The framed bytes of a message are exactly what tonic's prost codec sends.
    #[test]
    fn frames_match_the_generated_encoding() {
        for (offset, len) in [(0, 0), (0, 5), (7, INLINE_MAX), (1 << 40, INLINE_MAX + 1)] {
            let data: Bytes = (0..len).map(|i| (i % 251) as u8).collect::<Vec<_>>().into();
            let m = pb::ReadContentResponse { offset, data };
            let mut want = vec![0u8; PREFIX];
            m.encode(&mut want).unwrap();
            let n = (want.len() - PREFIX) as u32;
            want[1..PREFIX].copy_from_slice(&n.to_be_bytes());

            let (head, rest) = frame(m.clone()).unwrap();
            assert_eq!(rest.is_some(), len > INLINE_MAX);
            let mut got = head.to_vec();
            got.extend_from_slice(&rest.unwrap_or_default());
            assert_eq!(got, want, "offset {offset}, {len} bytes");
            assert_eq!(pb::ReadContentResponse::decode(&got[PREFIX..]).unwrap(), m);
        }
    }
}
