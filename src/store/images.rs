//! Images: named, namespaced pointers to a root descriptor (containerd's images service).
//! An image's target is a garbage-collection root, and so are its `gc.ref.content*` labels.

use std::collections::HashMap;

use prost::Message as _;

use super::keys::image_key;
use super::{ImageRecord, Scope, Store, decode, now_ns, validate_labels};
use crate::digest::Digest;
use crate::error::{Error, Kind, Result};
use crate::filter::{self, Adaptor, Filter};
use crate::kv::{Batch, Cf, prefix_end};

impl Adaptor for ImageRecord {
    fn field(&self, path: &[String]) -> Option<String> {
        match path.first().map(String::as_str) {
            Some("name") if path.len() == 1 => Some(self.name.clone()),
            Some("target") if path.len() == 2 => match path[1].as_str() {
                "digest" => Some(self.digest.clone()),
                "mediatype" => Some(self.media_type.clone()),
                _ => None,
            },
            Some("labels") => filter::label_field(path, |k| self.labels.get(k)),
            Some("annotations") if path.len() >= 2 => {
                self.annotations.get(&path[1..].join(".")).cloned()
            }
            _ => None,
        }
    }
}

fn validate(img: &ImageRecord) -> Result<()> {
    if img.name.is_empty() {
        return Err(Error::invalid("image name must not be empty"));
    }
    Digest::parse(&img.digest)
        .map_err(|e| Error::invalid(format!("image {:?}: target: {}", img.name, e.message())))?;
    if img.size <= 0 {
        return Err(Error::invalid(format!(
            "image {:?}: target size must be greater than zero",
            img.name
        )));
    }
    if img.media_type.is_empty() {
        return Err(Error::invalid(format!(
            "image {:?}: target media type must be set",
            img.name
        )));
    }
    validate_labels(&img.labels)
}

impl Store {
    pub fn image(&self, scope: &Scope, name: &str) -> Result<ImageRecord> {
        self.kv
            .get(Cf::Images, &image_key(scope, name))?
            .map(|v| decode("image", &v))
            .transpose()?
            .ok_or_else(|| Error::not_found(format!("image {name:?}: not found")))
    }

    pub fn list_images(&self, scope: &Scope, f: &Filter) -> Result<Vec<ImageRecord>> {
        self.list_images_named(scope, "", f)
    }

    /// The images of `scope` whose names start with `name_prefix` (a repository's tags, say),
    /// in name order: one range scan of those names, not of the whole namespace.
    pub fn list_images_named(
        &self,
        scope: &Scope,
        name_prefix: &str,
        f: &Filter,
    ) -> Result<Vec<ImageRecord>> {
        let prefix = image_key(scope, name_prefix);
        let mut out = Vec::new();
        let mut err = None;
        self.kv
            .scan(Cf::Images, &prefix, &prefix_end(&prefix), &mut |_, v| {
                match decode::<ImageRecord>("image", v) {
                    Ok(img) if f.matches(&img) => out.push(img),
                    Ok(_) => {}
                    Err(e) => {
                        err = Some(e);
                        return false;
                    }
                }
                true
            })?;
        err.map_or(Ok(out), Err)
    }

    /// Records a new image. Its target (which need not be stored yet) becomes a root.
    pub fn create_image(&self, scope: &Scope, mut img: ImageRecord) -> Result<ImageRecord> {
        validate(&img)?;
        let key = image_key(scope, &img.name);
        let _record = self.record_lock(&key);
        let _gate = self.gc_gate.read();
        if self.kv.get(Cf::Images, &key)?.is_some() {
            return Err(Error::exists(format!(
                "image {:?}: already exists",
                img.name
            )));
        }
        let now = now_ns();
        (img.created_ns, img.updated_ns) = (now, now);
        self.check_record_growth(0, img.encoded_len())?;
        self.barrier_image(scope, &img);
        let mut b = Batch::new();
        b.put(Cf::Images, key, img.encode_to_vec());
        self.kv.write(b, true)?;
        self.note_mutation();
        Ok(img)
    }

    /// Creates the image record, or points the existing one of that name at `img`'s target
    /// (and, with `labels`, replaces its labels): a pull, mirror check or push that names an
    /// image again. A record deleted between the two steps is created afresh.
    pub fn create_or_move_image(
        &self,
        scope: &Scope,
        img: ImageRecord,
        labels: bool,
    ) -> Result<ImageRecord> {
        let mut paths = vec!["target".to_string()];
        if labels {
            paths.push("labels".to_string());
        }
        // Bounded: a client deleting and re-creating the name in a loop cannot spin this.
        for _ in 0..8 {
            match self.create_image(scope, img.clone()) {
                Err(e) if e.is(Kind::AlreadyExists) => {
                    match self.update_image(scope, img.clone(), &paths) {
                        Err(e) if e.is(Kind::NotFound) => continue,
                        r => return r,
                    }
                }
                r => return r,
            }
        }
        Err(Error::new(
            Kind::Aborted,
            format!("image {:?} kept changing; try again", img.name),
        ))
    }

    /// Applies `update` to an image, limited to `paths` (`labels`, `labels.<k>`, `target`,
    /// `annotations`, `annotations.<k>`); no paths replaces labels, target and annotations.
    pub fn update_image(
        &self,
        scope: &Scope,
        update: ImageRecord,
        paths: &[String],
    ) -> Result<ImageRecord> {
        let key = image_key(scope, &update.name);
        let _record = self.record_lock(&key);
        let _gate = self.gc_gate.read();
        let mut img = self.image(scope, &update.name)?;
        let before = img.encoded_len();
        if paths.is_empty() {
            img.labels = update.labels.clone();
            img.annotations = update.annotations.clone();
            (img.media_type, img.digest, img.size) = (
                update.media_type.clone(),
                update.digest.clone(),
                update.size,
            );
        }
        for p in paths {
            let set = |map: &mut HashMap<String, String>,
                       from: &HashMap<String, String>,
                       k: &str| match from.get(k) {
                Some(v) if !v.is_empty() => {
                    map.insert(k.to_string(), v.clone());
                }
                _ => {
                    map.remove(k);
                }
            };
            match p.as_str() {
                "labels" => img.labels = update.labels.clone(),
                "annotations" => img.annotations = update.annotations.clone(),
                "target" => {
                    (img.media_type, img.digest, img.size) = (
                        update.media_type.clone(),
                        update.digest.clone(),
                        update.size,
                    );
                    img.annotations = update.annotations.clone();
                }
                p if p.starts_with("labels.") => {
                    set(&mut img.labels, &update.labels, &p["labels.".len()..])
                }
                p if p.starts_with("annotations.") => set(
                    &mut img.annotations,
                    &update.annotations,
                    &p["annotations.".len()..],
                ),
                other => {
                    return Err(Error::invalid(format!(
                        "cannot update {other:?} field on image {:?}",
                        img.name
                    )));
                }
            }
        }
        validate(&img)?;
        self.check_record_growth(before, img.encoded_len())?;
        img.updated_ns = now_ns();
        self.barrier_image(scope, &img);
        let mut b = Batch::new();
        b.put(Cf::Images, key, img.encode_to_vec());
        self.kv.write(b, true)?;
        self.note_mutation();
        Ok(img)
    }

    pub fn delete_image(&self, scope: &Scope, name: &str) -> Result<()> {
        let key = image_key(scope, name);
        let _record = self.record_lock(&key);
        if self.kv.get(Cf::Images, &key)?.is_none() {
            return Err(Error::not_found(format!("image {name:?}: not found")));
        }
        let mut b = Batch::new();
        b.delete(Cf::Images, key);
        self.kv.write(b, true)?;
        self.note_deletion();
        Ok(())
    }
}
